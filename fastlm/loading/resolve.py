"""Turn `model_name` into something on local disk, and say what kind of thing it is.

A model name may be: a local checkpoint directory (config.json + safetensors, single or sharded), a local
PEFT adapter directory (adapter_config.json), a `.gguf` file or a directory holding exactly one, or a
Hugging Face hub id, which is fetched into (or found in) the local hub cache, honouring `token`, `revision`
and offline mode. The token is passed to huggingface_hub only; it is never printed, logged or put in an error.
"""
import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("fastlm")

# Files fetched from the hub: configs, tokenizers, chat templates and safetensors weights (never pickles).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


@dataclass
class Source:
    """Where a model lies on disk.

    kind: "checkpoint" (HF directory), "adapter" (PEFT adapter directory) or "gguf".
    path: the directory (checkpoint, adapter) or the .gguf file.
    base_model: for an adapter, the base model name from adapter_config.json.
    """
    kind: str
    path: str
    base_model: Optional[str] = None


def resolve_source(model_name: str, token: Optional[str] = None, revision: Optional[str] = None,
                   trust_remote_code: bool = False) -> Source:
    """Find `model_name` locally or in the hub cache (downloading when online) and classify it.

    Raises:
        TypeError: model_name is not a string or path.
        FileNotFoundError: a local path that does not exist, or a directory with no config.json,
            adapter_config.json or .gguf file in it.
        OSError: a hub id that cannot be fetched (offline and not cached, unknown repository or
            revision, private repository without a token).
    """
    if not isinstance(model_name, (str, os.PathLike)):
        raise TypeError(f"model_name must be a path or a hub id string, got {type(model_name).__name__}.")
    model_name = os.path.expanduser(os.fspath(model_name))
    if os.path.exists(model_name):
        if revision is not None:
            logger.warning("fastlm: revision=%r applies to hub ids only; '%s' is a local path and loads as it is.",
                           revision, model_name)
        return _classify_local(model_name)
    if _looks_like_local_path(model_name):
        raise FileNotFoundError(f"No such file or directory: '{model_name}'. Check the path, or pass a "
                                "Hugging Face hub id such as 'unsloth/Llama-3.2-1B-Instruct'.")
    return _classify_local(_fetch_from_hub(model_name, token, revision, trust_remote_code))


def _looks_like_local_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else that is missing on disk was meant as a path."""
    return (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1 or "\\" in name
            or name.endswith(".gguf"))


def _classify_local(path: str) -> Source:
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return Source("gguf", path)
        raise FileNotFoundError(f"'{path}' is a file, but fastlm loads a checkpoint directory, an adapter "
                                "directory or a .gguf file. Pass the directory that holds config.json.")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return Source("adapter", path, base_model=_adapter_base(path))
    if os.path.isfile(os.path.join(path, "config.json")):
        return Source("checkpoint", path)
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return Source("gguf", ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(os.path.basename(g) for g in ggufs)
        raise FileNotFoundError(f"'{path}' holds several .gguf files ({names}); pass the path of the one to load.")
    found = ", ".join(sorted(os.listdir(path))[:20]) or "nothing"
    raise FileNotFoundError(f"'{path}' has no config.json, adapter_config.json or .gguf file (it holds: {found}). "
                            "Pass a directory saved with save_pretrained, or a .gguf file.")


def _adapter_base(path: str) -> str:
    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as err:
        raise OSError(f"Cannot read adapter config '{config_path}': {err}") from None
    if not base:
        raise ValueError(f"'{config_path}' names no base_model_name_or_path; load the base model with "
                         "from_pretrained and attach the adapter with peft.PeftModel.from_pretrained.")
    return base


def _fetch_from_hub(repo_id: str, token: Optional[str], revision: Optional[str], trust_remote_code: bool) -> str:
    """Local snapshot directory of a hub repository (from the cache when offline)."""
    import huggingface_hub
    from huggingface_hub import errors

    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
    except errors.HFValidationError:
        raise FileNotFoundError(f"'{repo_id}' is neither an existing local path nor a valid hub id.") from None
    except errors.RevisionNotFoundError:
        raise OSError(f"Revision '{revision}' does not exist for {where} on the hub.") from None
    except errors.RepositoryNotFoundError:  # also GatedRepoError
        raise OSError(f"{where} was not found on the hub, or it is private or gated: check the name, and pass "
                      "token=... (or log in with `hf auth login`) if you have access.") from None
    except Exception as err:  # offline mode, no network, cache miss: all mean "not available here"
        cached = _cached_commit_snapshot(repo_id, revision)
        if cached is not None:
            return cached
        raise OSError(f"{where} is not a local path, is not in the local Hugging Face cache, and could not be "
                      f"downloaded ({type(err).__name__}). If you are offline (HF_HUB_OFFLINE=1 or no network), "
                      "download it where there is network or pass a local directory.") from None


def _cached_commit_snapshot(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The cached snapshot folder of `repo_id` at a full commit hash, when it holds a config.json.

    Some huggingface_hub releases (1.33 among them) refuse an offline snapshot_download at a commit hash even
    when that snapshot is in the cache; huggingface_hub's own cache lookup finds it."""
    import huggingface_hub
    import huggingface_hub.constants

    if not revision or not re.fullmatch(r"[0-9a-f]{40}", revision):
        return None
    config = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision,
                                                    cache_dir=huggingface_hub.constants.HF_HUB_CACHE)
    return os.path.dirname(config) if isinstance(config, str) else None
