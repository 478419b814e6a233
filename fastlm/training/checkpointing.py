"""Gradient checkpointing modes: True, False, or "unsloth".

"unsloth" is accepted for compatibility with Unsloth; for now it is plain (non-reentrant) checkpointing of each
decoder layer, the same as True. The offloaded variant (layer inputs kept in pinned host memory) replaces it in
the fast-training-path work.
"""
from typing import Union


def check_mode(value) -> Union[bool, str]:
    if value is True or value is False or value == "unsloth":
        return value
    raise ValueError(f"use_gradient_checkpointing must be True, False or \"unsloth\", got {value!r}.")


def set_gradient_checkpointing(model, mode: Union[bool, str]) -> None:
    """Turn checkpointing of `model`'s decoder layers on or off (a transformers PreTrainedModel)."""
    check_mode(mode)
    if not getattr(model, "supports_gradient_checkpointing", False):
        if mode:
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; pass "
                             "use_gradient_checkpointing=False.")
        return
    # transformers 5.24 renamed gradient_* to activation_* (the old names warn); 5.17 has only the old names.
    if mode:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
