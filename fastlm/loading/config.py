"""Read a checkpoint's config, check it is a causal LM, and stretch its RoPE to `max_seq_length`."""
import copy
import json
import logging
import os
from typing import Optional

logger = logging.getLogger("fastlm")


def load_config(path: str, trust_remote_code: bool):
    """The transformers config of the checkpoint directory `path`.

    Raises:
        OSError: config.json is unreadable or not valid JSON.
        ValueError: the architecture is unknown to transformers (maybe needs trust_remote_code=True), or the
            model is not a causal language model.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise OSError(f"Cannot read '{config_file}': {err}. The checkpoint is damaged; download or save it again.") \
            from None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        hint = "" if trust_remote_code else " If it ships its own modeling code, pass trust_remote_code=True."
        raise ValueError(f"transformers does not know the architecture of '{path}' "
                         f"(model_type={raw.get('model_type')!r}).{hint} ({err})") from None
    remote_causal = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (trust_remote_code and remote_causal):
        raise ValueError(f"'{path}' is a {config.model_type!r} model ({', '.join(raw.get('architectures') or [])}), "
                         "not a causal language model: FastLanguageModel fine-tunes text generation models "
                         "such as Llama, Mistral, Qwen, Gemma or Phi-3.")
    return config


def stretch_context(config, max_seq_length: int, rope_scaling: Optional[dict]) -> None:
    """Make `config` cover `max_seq_length` positions.

    `rope_scaling` (transformers' rope parameters, e.g. {"rope_type": "yarn", "factor": 4.0}; the older "type"
    key is accepted) is applied as given. Otherwise, when `max_seq_length` exceeds `max_position_embeddings`,
    RoPE is stretched linearly by max_seq_length / max_position_embeddings, with a warning. Gemma-style configs
    with one RoPE per layer type get the scaling on their full-attention layers only (sliding-window layers
    never see distant positions).
    """
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}.")
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling must be a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                        f"got {rope_scaling!r}.")
    trained_length = getattr(config, "max_position_embeddings", None)
    if not getattr(config, "rope_parameters", None):
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling was given, but {config.model_type!r} models do not use RoPE.")
        if trained_length and max_seq_length > trained_length:
            logger.warning("fastlm: %r models have learned positions for %d tokens only; sequences longer than that "
                           "will fail (max_seq_length=%d).", config.model_type, trained_length, max_seq_length)
        return
    scaling = None
    if rope_scaling is not None:
        scaling = dict(rope_scaling)
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        if "rope_type" not in scaling:
            raise ValueError(f"rope_scaling={rope_scaling!r} needs a 'rope_type' (linear, dynamic, yarn, llama3, ...).")
    elif trained_length and max_seq_length > trained_length:
        scaling = {"rope_type": "linear", "factor": max_seq_length / trained_length}
        logger.warning("fastlm: max_seq_length=%d exceeds the model's max_position_embeddings=%d; RoPE is "
                       "stretched linearly by %.3gx. Quality beyond the trained length needs fine-tuning on long "
                       "sequences.", max_seq_length, trained_length, scaling["factor"])
    if scaling is None:
        return
    params = copy.deepcopy(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:   # one RoPE per layer type (Gemma 2/3)
        params["full_attention"] = {**params["full_attention"], **scaling}
    else:
        params = {**params, **scaling}
    config.rope_parameters = params
    if trained_length and max_seq_length > trained_length:
        config.max_position_embeddings = max_seq_length
