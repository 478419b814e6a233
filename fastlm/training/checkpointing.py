"""Gradient checkpointing modes: True, False, or "unsloth".

True: torch's non-reentrant checkpoint of each decoder layer (transformers' own activation checkpointing).
"unsloth": offloaded checkpointing (fastlm/training/offload.py): each layer's input waits in pinned host memory
instead of on the GPU; on a CPU it is plain checkpointing. It is installed on the model instance through
transformers' extension point `_set_gradient_checkpointing(enable=True, gradient_checkpointing_func=...)`
(the same signature from 4.35 through 5.24), which sets `_gradient_checkpointing_func` on that model's modules
with a `gradient_checkpointing` flag only (the decoder, e.g. LlamaModel, and its GradientCheckpointingLayer
layers); nothing global changes.
"""
import inspect
from typing import Union


def check_mode(value) -> Union[bool, str]:
    if value is True or value is False or value == "unsloth":
        return value
    raise ValueError(f"use_gradient_checkpointing must be True, False or \"unsloth\", got {value!r}.")


def set_gradient_checkpointing(model, mode: Union[bool, str]) -> None:
    """Turn checkpointing of `model`'s decoder layers on or off (a transformers PreTrainedModel or a PeftModel)."""
    check_mode(mode)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    if not getattr(model, "supports_gradient_checkpointing", False):
        if mode:
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; pass "
                             "use_gradient_checkpointing=False.")
        return
    if mode == "unsloth":
        _enable_offloaded(model)
        model.config.use_cache = False
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


def checkpointing_module(model) -> tuple:
    """(module, checkpoint function) of the first module of `model`, in modules() order, that checkpoints: the
    decoder (e.g. LlamaModel), whose layers use the same function; (None, None) when checkpointing is off."""
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None and getattr(module, "gradient_checkpointing", False):
            return module, function
    return None, None


def _enable_offloaded(model) -> None:
    """Install a fresh OffloadedCheckpoint as this model's checkpoint function.

    Unlike transformers' enable path this does not hook the input embeddings to require grad: the offloaded
    checkpoint gives the layers' trainable parameters their gradients without it, and layer 0 is spared
    computing a gradient for its input that nothing uses.
    """
    from fastlm.training.offload import OffloadedCheckpoint

    setter = model._set_gradient_checkpointing
    if "gradient_checkpointing_func" not in inspect.signature(setter).parameters:
        raise ValueError(f"{type(model).__name__} uses transformers' pre-4.35 checkpointing interface, which takes "
                         "no checkpoint function; use use_gradient_checkpointing=True.")
    setter(enable=True, gradient_checkpointing_func=OffloadedCheckpoint())
