"""Apply an architecture's ModelSpec to one model instance: fused norms, MLP, attention (RoPE) and loss.

Everything happens on the instance: each module's `forward` attribute is set (or, when accelerate has hooked
the module, the `_old_forward` its hook calls), nothing of transformers' classes or source changes, and
another model loaded with plain transformers in the same process is untouched. Parameters, module names and
the state_dict stay as they were, so PEFT (LoRA, modules_to_save), saving and loading behave as before.

    norms      every input/post-attention norm, Gemma 2/3 pre/post feed-forward norm, the final norm and
               Qwen 3 / Gemma 3 q/k norms -> fastlm.kernels.rms_norm (Llama or Gemma (1 + w) style)
    mlp        gate/up/down as they are (PEFT LoRA layers included), act(gate) * up fused (SwiGLU / GeGLU)
    attention  fastlm.models.attention.attention_forward: RoPE kernel + transformers' attention function
    loss       fastlm.models.causal_lm.causal_lm_forward: fused linear cross-entropy when labels are given (and
               hook_fused_head: a right-padded batch's mask dropped before TRL's fused LM head too)
    decoder    fastlm.models.causal_lm.decoder_forward: training batches run at their length bucket
"""
import functools
import inspect
import logging
import os
import types

from fastlm.models.attention import attention_forward, missing_parts, settings_for
from fastlm.models.causal_lm import causal_lm_forward, decoder_forward, hook_fused_head
from fastlm.models.layers import (activation_of, layer_norm_forward, mlp_forward, norm_matches,
                                  rms_norm_forward)

logger = logging.getLogger("fastlm")

_PATCHED = "_fastlm_patched"  # set on every module whose forward fastlm replaced
SWITCH = "FASTLM_FAST_PATH"  # "1": always apply, "0": never, unset/"auto": when the model is on a CUDA device
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def set_instance_forward(module, function, signature_of=None, **settings) -> None:
    """Make `function(module, ..., **settings)` the module's forward, on this instance only.

    signature_of: a function whose signature the new forward shows to inspect.signature (generate and the
    Trainer read the forward's parameters, e.g. `logits_to_keep`, `**kwargs`)."""
    bound_function = functools.partial(function, **settings)
    if signature_of is not None:
        bound_function.__signature__ = inspect.signature(signature_of)
    method = types.MethodType(bound_function, module)
    if getattr(module, "_hf_hook", None) is not None and hasattr(module, "_old_forward"):
        module._old_forward = method  # accelerate's hook wraps forward and calls _old_forward
    else:
        module.forward = method
    setattr(module, _PATCHED, function.__name__)


def is_patched(module) -> bool:
    return getattr(module, _PATCHED, None) is not None


def fast_path_wanted(model) -> bool:
    """Whether from_pretrained should apply the fast path to `model`.

    By default only for a model on CUDA: on a CPU the kernels run their plain-PyTorch references (or, in the
    tests, the slow Triton interpreter), so plain transformers is as fast there. FASTLM_FAST_PATH=1 forces the
    fast path (the tests use it), FASTLM_FAST_PATH=0 turns it off (to compare against plain transformers).
    """
    setting = os.environ.get(SWITCH, "auto").strip().lower()
    if setting not in ("0", "1", "auto", ""):
        raise ValueError(f"{SWITCH} must be 1, 0 or auto, got {os.environ[SWITCH]!r}")
    if setting in ("0", "1"):
        return setting == "1"
    return any(param.is_cuda for param in model.parameters())


def _decoder(model):
    """The decoder stack (e.g. LlamaModel) under a *ForCausalLM."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or not hasattr(base, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder with `layers` under "
                         f"'{getattr(model, 'base_model_prefix', None)}'")
    return base


def _norm_modules(decoder, spec) -> list:
    """(qualified name, module) of every norm the spec names, in layer order, then the final norm."""
    found = []
    for index, layer in enumerate(decoder.layers):
        for name in _LAYER_NORMS + tuple(spec.extra_norms):
            found.append((f"layers.{index}.{name}", getattr(layer, name, None)))
        if spec.qk_norm:
            attention = getattr(layer, "self_attn", None)
            for name in ("q_norm", "k_norm"):
                found.append((f"layers.{index}.self_attn.{name}", getattr(attention, name, None)))
    found.append(("norm", getattr(decoder, "norm", None)))
    return found


def _patch_norms(decoder, spec, report) -> None:
    if spec.norm == "layer":
        function, settings = layer_norm_forward, {}
    else:
        function, settings = rms_norm_forward, {"gemma_style": spec.norm == "rms_gemma"}
    checked = {}  # class -> probe result (one probe per class)
    for name, module in _norm_modules(decoder, spec):
        if module is None or getattr(module, "weight", None) is None:
            report["skipped"].append(f"{name}: missing")
            continue
        cls = type(module)
        if cls not in checked:
            checked[cls] = norm_matches(module, functools.partial(function, **settings))
            if not checked[cls]:
                logger.warning("fastlm: %s does not compute the %s norm fastlm expects; left unpatched.",
                               cls.__name__, spec.norm)
        if checked[cls]:
            set_instance_forward(module, function, **settings)
            report["norms"] += 1
        else:
            report["skipped"].append(f"{name}: {cls.__name__} differs")


def _patch_mlps(decoder, spec, report) -> None:
    fused = "gate_up_proj" in spec.fused_projections
    projections = ("gate_up_proj", "down_proj") if fused else ("gate_proj", "up_proj", "down_proj")
    for index, layer in enumerate(decoder.layers):
        mlp = getattr(layer, "mlp", None)
        activation = getattr(mlp, spec.mlp_activation_attr, None)
        if mlp is None or activation is None or any(not hasattr(mlp, p) for p in projections):
            report["skipped"].append(f"layers.{index}.mlp: not a gated MLP")
            continue
        probed = activation_of(activation)  # what the module computes (a config may override spec.activation)
        if probed == "unknown":
            report["skipped"].append(f"layers.{index}.mlp: activation {type(activation).__name__}")
            continue
        set_instance_forward(mlp, mlp_forward, activation=probed, fused_gate_up=fused)
        report["mlp"] += 1


def _patch_attention(decoder, spec, report) -> None:
    for index, layer in enumerate(decoder.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is None:
            report["skipped"].append(f"layers.{index}.self_attn: missing")
            continue
        try:
            settings = settings_for(attention, spec)
        except ValueError as err:
            report["skipped"].append(f"layers.{index}.self_attn: {err}")
            continue
        missing = missing_parts(attention, settings)
        if missing:
            report["skipped"].append(f"layers.{index}.self_attn: lacks {', '.join(missing)}")
            continue
        set_instance_forward(attention, attention_forward, fastlm_settings=settings)
        report["attention"] += 1


def apply_fast_path(model, spec) -> dict:
    """Put fastlm's kernels into `model` (a transformers *ForCausalLM of the family `spec` describes).

    Args:
        model: the loaded model instance (not a PeftModel: call this before adding adapters).
        spec: its ModelSpec (fastlm.models.registry.spec_for(model.config.model_type)).
    Returns:
        {"norms": n, "mlp": n, "attention": n, "loss": bool, "skipped": [reasons]}: what was patched.
    Raises:
        TypeError for a PeftModel; ValueError when spec and model disagree on model_type.
    """
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise TypeError("apply_fast_path acts on the transformers model; call it before get_peft_model "
                        "(or pass model.get_base_model()).")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != spec.model_type:
        raise ValueError(f"apply_fast_path: the model is {model_type!r} but the spec describes {spec.model_type!r}")
    report = {"norms": 0, "mlp": 0, "attention": 0, "loss": False, "skipped": []}
    decoder = _decoder(model)
    _patch_norms(decoder, spec, report)
    _patch_mlps(decoder, spec, report)
    _patch_attention(decoder, spec, report)
    set_instance_forward(decoder, decoder_forward, signature_of=type(decoder).forward)
    if model.get_output_embeddings() is not None:
        set_instance_forward(model, causal_lm_forward, signature_of=type(model).forward,
                             final_softcap_key=spec.final_softcap_key)
        hook_fused_head(model)  # TRL's fused head bypasses that forward (fastlm.models.causal_lm)
        report["loss"] = True
    else:
        report["skipped"].append("loss: no lm_head")
    logger.info("fastlm: fast path on %s: %d norms, %d MLPs, %d attention modules, fused loss %s%s",
                type(model).__name__, report["norms"], report["mlp"], report["attention"],
                "on" if report["loss"] else "off",
                f"; left as transformers: {'; '.join(report['skipped'])}" if report["skipped"] else "")
    return report
