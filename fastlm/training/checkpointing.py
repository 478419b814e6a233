"""Gradient checkpointing modes: True, False, or "unsloth".

True: torch's non-reentrant checkpoint of each decoder layer (transformers' own activation checkpointing).
"unsloth": offloaded checkpointing (fastlm/training/offload.py): each layer's input waits in pinned host memory
instead of on the GPU; on a CPU it is plain checkpointing. It is installed on the model instance through
transformers' extension point `_set_gradient_checkpointing(enable=True, gradient_checkpointing_func=...)`
(the same signature from 4.35 through 5.24), which sets `_gradient_checkpointing_func` on that model's modules
with a `gradient_checkpointing` flag only (the decoder, e.g. LlamaModel, and its GradientCheckpointingLayer
layers); nothing global changes.

A trainer that turns checkpointing on itself (transformers.Trainer with `gradient_checkpointing=True`, TRL's
SFTConfig, whose default is True) calls the same extension point with torch's checkpoint; under "unsloth" that would
silently swap the offloaded checkpoint (and its CUDA graphs and saved attention) for plain checkpointing, ~2x the
step time under SFTTrainer (bench/RESULTS.md run 98). So "unsloth" also sets `_set_gradient_checkpointing` on the
model instance to `_keep_offloaded`: turning checkpointing on keeps the model's OffloadedCheckpoint (its other
arguments, e.g. transformers 5.24's every_n_layers, pass through), turning it off works as before. Setting True or
False through fastlm removes it.
"""
import functools
import inspect
import logging
from typing import Union

logger = logging.getLogger("fastlm")


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
    model.__dict__.pop("_set_gradient_checkpointing", None)  # _keep_offloaded, from an earlier "unsloth"
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
    checkpoint = OffloadedCheckpoint()
    setter(enable=True, gradient_checkpointing_func=checkpoint)
    model._set_gradient_checkpointing = functools.partial(_keep_offloaded, model, checkpoint)


def _keep_offloaded(model, checkpoint, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
    """`model._set_gradient_checkpointing` while use_gradient_checkpointing="unsloth" is set: the class's own with
    `checkpoint` (the model's OffloadedCheckpoint) as the function whenever checkpointing is turned on."""
    if enable and gradient_checkpointing_func is not checkpoint:
        logger.info("fastlm: a request to turn gradient checkpointing on keeps use_gradient_checkpointing=\"unsloth\" "
                    "(offloaded checkpointing) instead of %r; set another mode with "
                    "FastLanguageModel.for_training(model, use_gradient_checkpointing=...).",
                    getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func))
    if enable or gradient_checkpointing_func is not None:
        kwargs["gradient_checkpointing_func"] = checkpoint if enable else gradient_checkpointing_func
    type(model)._set_gradient_checkpointing(model, enable=enable, **kwargs)
