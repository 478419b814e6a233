"""What fastlm remembers about a model it loaded, kept on the model instance itself."""
from dataclasses import dataclass
from typing import Optional, Union

from fastlm.loading.precision import Precision
from fastlm.models.registry import ModelSpec

ATTRIBUTE = "fastlm_state"


@dataclass
class FastLMState:
    """Attached to the base model as `model.fastlm_state`.

    precision: how the weights are held (mode, compute dtype, fp32 trainable parameters).
    spec: the architecture's ModelSpec, or None when fastlm has no fast path for it.
    max_seq_length: the context length asked for at load time.
    use_gradient_checkpointing: the from_pretrained default, used by get_peft_model / for_training.
    tokenizer: the tokenizer loaded with the model (for_inference / for_training switch its padding side).
    tiled_mlp: from_pretrained's unsloth_tiled_mlp: get_peft_model's fused LoRA MLPs run by blocks of rows.
    """
    precision: Precision
    spec: Optional[ModelSpec]
    max_seq_length: int
    use_gradient_checkpointing: Union[bool, str]
    random_state: int
    tokenizer: object = None
    tiled_mlp: bool = False


def base_model_of(model):
    """The transformers model under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def state_of(model) -> Optional[FastLMState]:
    return getattr(base_model_of(model), ATTRIBUTE, None)
