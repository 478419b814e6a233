"""Put fastlm's fused LoRA (fastlm.kernels.lora, lora_mlp) under a PEFT model's MLPs and attention projections.

Everything happens on the model instance: the fused paths are installed by setting `forward` on module
instances (the MLP, each LoRA projection) and by adding `fastlm_project_qkv` to each attention module,
which fastlm's attention forward calls when present. No module is replaced, so PEFT's module names,
state dict, save_pretrained and adapter loading are untouched, and a model loaded later in the same
process is plain transformers.

What takes the fused path, checked again at every call (adapters can be disabled, merged or switched
after installing): a PEFT `lora.Linear` (or the bitsandbytes variants) with exactly one active adapter,
lora_dropout == 0, no DoRA or other variant, no bias on lora_B, not merged, adapters enabled, over a
frozen nn.Linear, bitsandbytes Linear4bit (NF4/FP4) or Linear8bitLt (int8 weights) base with a frozen
bias or none; a plain frozen base without LoRA also fits (e.g. an MLP where only down_proj has LoRA).
Anything else runs the module's previous forward (PEFT's own), the whole MLP or q/k/v group at once; so
does generation (eval mode with autograd off), where bitsandbytes' decode kernels beat dequantize + GEMM.

Entry point: install_fused_lora(model) -> report dict; prints one line per model saying how many
MLPs, q/k/v groups and projections took the fused path, and why the others did not.
"""
import logging
import types
from collections import Counter

import torch

from fastlm.kernels.lora import DenseWeight, Int8Weight, LoRA, NF4Weight, lora_projections
from fastlm.kernels.lora_mlp import lora_mlp

logger = logging.getLogger("fastlm")

# Module layouts, as data: (input projections, output projection) of a gated MLP; the q/k/v groups.
MLP_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("gate_up_proj",), "down_proj"))
MLP_ACTIVATION_ATTRS = ("act_fn", "activation_fn")
QKV_LAYOUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
PROJECTION_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                    "down_proj")
_MARK = "_fastlm_fused_lora"          # set on every module whose forward we own
_PREVIOUS = "_fastlm_previous_forward"  # the forward it had before (PEFT's, or another fastlm patch)
_DESCRIBED = "_fastlm_described"        # (state key, describe_projection's answer) kept on each projection


def _bnb_classes():
    try:
        import bitsandbytes as bnb
        return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
    except Exception:  # not installed (or no backend): no quantized layers can exist either
        return (), ()


def frozen_weight(layer):
    """(FrozenWeight, None) for a supported frozen base layer, else (None, reason)."""
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None, "trainable base weight or bias"
    return readable_weight(layer)


def readable_weight(layer):
    """(DenseWeight / NF4Weight / Int8Weight, None) reading the weight of a plain nn.Linear or a bitsandbytes 4-bit
    or 8-bit linear layer, trainable or not (fastlm.export merges with it), else (None, reason)."""
    linear4, linear8 = _bnb_classes()
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if weight is None:
        return None, f"base layer {type(layer).__name__} unsupported"
    if linear4 and isinstance(layer, linear4):
        state = getattr(weight, "quant_state", None) or getattr(layer, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None, "4-bit weight repacked for bitsandbytes' CPU inference kernel"
        return NF4Weight(weight.data, state, bias), None
    if linear8 and isinstance(layer, linear8):
        scb = getattr(weight, "SCB", None)
        scb = scb if scb is not None else getattr(layer.state, "SCB", None)
        if layer.state.has_fp16_weights or weight.dtype != torch.int8 or scb is None:
            return None, "8-bit layer without int8 weights"
        return Int8Weight(weight.data, scb, bias), None
    if type(layer) is torch.nn.Linear:
        return DenseWeight(weight, bias), None
    return None, f"base layer {type(layer).__name__} unsupported"


def describe_projection(module):
    """(base FrozenWeight, LoRA or None, None) when `module` can take the fused path, else (None, None, reason).

    Called for every projection at every forward and recomputation (448 calls per Llama-3.1-8B step), so the
    answer is kept on the module with the state it was derived from (projection_state) and derived again only when
    that state changed: an adapter switched, merged, disabled, rescaled or replaced, a base weight replaced or
    unfrozen."""
    key = projection_state(module)
    cached = module.__dict__.get(_DESCRIBED)
    if cached is not None and cached[0] == key:
        return cached[1]
    described = _describe_projection(module)
    module.__dict__[_DESCRIBED] = (key, described)
    return described


def projection_state(module) -> tuple:
    """What describe_projection's answer depends on and what can change after installing, read from the modules'
    own dicts (torch.nn.Module.__getattr__ and PEFT's get_base_layer cost microseconds each): identities of the
    base layer, its weight (and the weight's storage and 4-bit quant_state: module.to() swaps them under the same
    Parameter) and bias, and of the active adapter's A, B and dropout modules and of A's and B's weight
    Parameters; requires_grad of the base weight and bias; the active adapters, merged adapters, the disabled
    flag, the scale and the dropout probability. Identity alone would not do for the flags and values, which PEFT
    changes in place."""
    modules = module.__dict__.get("_modules", {})
    base = module
    while "base_layer" in base.__dict__.get("_modules", {}):  # PEFT's get_base_layer, through the dicts
        base = base.__dict__["_modules"]["base_layer"]
    params = base.__dict__.get("_parameters", {})
    weight, bias = params.get("weight"), params.get("bias")
    key = (id(base), id(weight), weight is not None and weight.data_ptr(), id(getattr(weight, "quant_state", None)),
           weight is not None and weight.requires_grad, id(bias), bias is not None and bias.requires_grad)
    if "lora_A" not in modules:
        return key
    actives = tuple(module.active_adapters)
    dropouts = tuple(modules["lora_dropout"]._modules.get(a) for a in actives)
    return key + (actives, tuple(module.merged_adapters), module.disable_adapters,
                  tuple(module.scaling.get(a) for a in actives), tuple(getattr(d, "p", None) for d in dropouts),
                  tuple(id(d) for d in dropouts),
                  tuple(_module_and_weight(modules["lora_A"]._modules.get(a)) for a in actives),
                  tuple(_module_and_weight(modules["lora_B"]._modules.get(a)) for a in actives))


def _module_and_weight(linear) -> tuple:
    """Identities of an adapter's linear and of its weight Parameter (replaced without replacing the module when
    a Parameter is assigned, e.g. by layer_graphs during a capture)."""
    return (id(linear), id(linear.__dict__["_parameters"].get("weight")) if linear is not None else None)


def _describe_projection(module):
    """describe_projection's answer, derived from the modules."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        base, reason = frozen_weight(module)
        return base, None, reason
    if module.merged:
        return None, None, "adapter merged"
    if module.disable_adapters:
        return None, None, "adapters disabled"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return None, None, f"{len(active)} active adapters"
    name = active[0]
    dropout = module.lora_dropout[name]
    if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        return None, None, "lora_dropout > 0"
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None, None, "DoRA or another LoRA variant"
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
        return None, None, f"{type(module).__name__} is not a linear LoRA layer"
    if lora_b.bias is not None:
        return None, None, "LoRA bias (lora_bias=True)"
    if getattr(module, "fan_in_fan_out", False):
        return None, None, "fan_in_fan_out weights"
    base, reason = frozen_weight(module.get_base_layer())
    if reason:
        return None, None, reason
    return base, LoRA(lora_a.weight, lora_b.weight, float(module.scaling[name])), None


def _generating(module) -> bool:
    """Eval mode without autograd (generation): the previous forward is used there. The fused nodes pay off in
    training (memory saved for backward, fewer nodes); for decoding bitsandbytes' own 4-bit kernels (gemv, no
    dequantized weight) are faster than dequantize + GEMM."""
    return not module.training and not torch.is_grad_enabled()


def _single_input(args, kwargs):
    """The one tensor a projection/MLP forward was called with, or None for anything more unusual."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and len(kwargs) == 1:
        return next(iter(kwargs.values()))
    return None


def _fused_projection_forward(self, *args, **kwargs):
    """forward of one LoRA projection (o_proj, or q/k/v called one by one): one fused node."""
    x = _single_input(args, kwargs)
    base, lora, reason = describe_projection(self) if x is not None and not _generating(self) else (None, None, "-")
    if reason:
        return getattr(self, _PREVIOUS)(*args, **kwargs)
    return lora_projections(x, [base], [lora])[0]


def _mlp_parts(mlp):
    """(in projection modules, down module) of a gated MLP, or None."""
    for ins, out in MLP_LAYOUTS:
        if all(hasattr(mlp, n) for n in ins) and hasattr(mlp, out):
            return [getattr(mlp, n) for n in ins], getattr(mlp, out)
    return None


def _mlp_plan(mlp):
    """(in_bases, in_loras, down_base, down_lora, None) or (None, .., reason)."""
    ins, down = _mlp_parts(mlp)
    described = [describe_projection(m) for m in ins + [down]]
    for _, _, reason in described:
        if reason:
            return None, None, None, None, reason
    bases, loras = [d[0] for d in described], [d[1] for d in described]
    return bases[:-1], loras[:-1], bases[-1], loras[-1], None


def _fused_mlp_forward(self, *args, **kwargs):
    """forward of a gated MLP: gate, up, activation and down with their LoRAs in one autograd node."""
    x = _single_input(args, kwargs)
    if x is not None and not _generating(self):
        in_bases, in_loras, down_base, down_lora, reason = _mlp_plan(self)
        if not reason:
            return lora_mlp(x, in_bases, in_loras, down_base, down_lora, self._fastlm_activation,
                            output_feeds_residual=self._fastlm_feeds_residual, tiled=self._fastlm_tiled)
    return getattr(self, _PREVIOUS)(*args, **kwargs)


def _project_qkv(self, hidden_states):
    """fastlm_project_qkv: hidden_states (B, T, H) -> q (B, T, nh*hd), k, v (B, T, nkv*hd), one fused node."""
    if hasattr(self, "qkv_proj"):  # Phi-3: one projection (itself fused), split as Phi3Attention splits it
        qkv = self.qkv_proj(hidden_states)
        q_size = self._fastlm_q_size
        kv_size = (qkv.shape[-1] - q_size) // 2
        return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    modules = (self.q_proj, self.k_proj, self.v_proj)
    described = [describe_projection(m) for m in modules]
    if _generating(self) or any(reason for _, _, reason in described):
        return tuple(m(hidden_states) for m in modules)
    return lora_projections(hidden_states, [d[0] for d in described], [d[1] for d in described])


def detect_activation(act_fn) -> str:
    """"silu", "gelu_tanh" or "gelu" when `act_fn` computes exactly that on a probe, else None.

    By value, not class name: transformers' activation classes are renamed between versions."""
    probe = torch.linspace(-6, 6, 97, dtype=torch.float32)
    try:
        out = act_fn(probe)
    except Exception:
        return None
    candidates = {"silu": torch.nn.functional.silu(probe),
                  "gelu_tanh": torch.nn.functional.gelu(probe, approximate="tanh"),
                  "gelu": torch.nn.functional.gelu(probe)}
    for name, expected in candidates.items():
        if torch.is_tensor(out) and out.shape == expected.shape and torch.allclose(out, expected, rtol=0, atol=1e-6):
            return name
    return None


def _own_forward(module, function) -> None:
    """Make `function` (bound to module) its forward, keeping the forward it had as the fallback.

    When accelerate has hooked the module (device_map dispatch), its hook calls `_old_forward`: that is
    the one replaced, so the hook keeps moving tensors between devices."""
    method = types.MethodType(function, module)
    if getattr(module, "_hf_hook", None) is not None and hasattr(module, "_old_forward"):
        setattr(module, _PREVIOUS, module._old_forward)
        module._old_forward = method
    else:
        setattr(module, _PREVIOUS, module.forward)
        module.forward = method
    setattr(module, _MARK, True)


def _has_lora(modules) -> bool:
    from peft.tuners.lora import LoraLayer
    return any(isinstance(m, LoraLayer) for m in modules)


def install_fused_lora(model, verbose: bool = True, mlp_feeds_residual: bool = False,
                       tiled_mlp: bool = False) -> dict:
    """Install the fused LoRA paths on every MLP, attention and LoRA projection of `model` (an instance).

    Args:
        model: a peft.PeftModel (or any nn.Module holding PEFT LoRA layers). Calling it twice is harmless.
        verbose: print the one-line summary.
        mlp_feeds_residual: the family's decoder layers add each MLP output straight to the residual stream
            (ModelSpec.mlp_feeds_residual): fused MLPs then skip their down projection when recomputed for
            backward by fastlm's offloaded checkpointing. Leave False when unsure.
        tiled_mlp: fused MLPs run by blocks of rows and make gate / up again in backward (lora_mlp's `tiled`);
            a warning names the MLPs that cannot (PEFT's path, or no LoRA in them).
    Returns:
        {"mlp" | "qkv" | "projections": {"fused": int, "peft": {reason: count}}}: what each took at install
        time. ("qkv" counts attention modules given `fastlm_project_qkv`; it is used where fastlm's attention
        forward is installed, else q/k/v run one by one through their own fused forwards.)
    """
    report = {kind: {"fused": 0, "peft": Counter()} for kind in ("mlp", "qkv", "projections")}
    plain_mlps = 0  # gated MLPs without any LoRA: transformers' own forward
    for _, module in model.named_modules():
        parts = _mlp_parts(module)
        act = next((getattr(module, a) for a in MLP_ACTIVATION_ATTRS if hasattr(module, a)), None)
        is_mlp = parts is not None and act is not None
        has_lora = is_mlp and _has_lora(parts[0] + [parts[1]])
        plain_mlps += is_mlp and not has_lora
        if has_lora:
            activation = detect_activation(act)
            reason = _mlp_plan(module)[-1] if activation else f"activation {type(act).__name__} not supported"
            if reason:
                report["mlp"]["peft"][reason] += 1
            else:
                report["mlp"]["fused"] += 1
                module._fastlm_feeds_residual, module._fastlm_tiled = mlp_feeds_residual, tiled_mlp
                if not getattr(module, _MARK, False):
                    module._fastlm_activation = activation
                    _own_forward(module, _fused_mlp_forward)
        layout = next((names for names in QKV_LAYOUTS if all(hasattr(module, n) for n in names)), None)
        if layout is not None and hasattr(module, "o_proj") and _has_lora([getattr(module, n) for n in layout]):
            reasons = [describe_projection(getattr(module, n))[2] for n in layout]
            reason = next((r for r in reasons if r), None)
            if reason:
                report["qkv"]["peft"][reason] += 1
            else:
                report["qkv"]["fused"] += 1
                if layout == ("qkv_proj",):
                    module._fastlm_q_size = _base_of(module.o_proj).in_features
                module.fastlm_project_qkv = types.MethodType(_project_qkv, module)
        for name in PROJECTION_NAMES:
            child = getattr(module, name, None)
            if child is None or not _has_lora([child]):
                continue
            reason = describe_projection(child)[2]
            if reason:
                report["projections"]["peft"][reason] += 1
            else:
                report["projections"]["fused"] += 1
                if not getattr(child, _MARK, False):
                    _own_forward(child, _fused_projection_forward)
    report = {k: {"fused": v["fused"], "peft": dict(v["peft"])} for k, v in report.items()}
    untiled = sum(report["mlp"]["peft"].values()) + plain_mlps
    if tiled_mlp and untiled:
        logger.warning("fastlm: unsloth_tiled_mlp=True, but %d of %d MLPs run untiled (%s).", untiled,
                       untiled + report["mlp"]["fused"],
                       ", ".join([f"{n} on PEFT's path: {r}" for r, n in report["mlp"]["peft"].items()] +
                                 ([f"{plain_mlps} without LoRA"] if plain_mlps else [])))
    line = summarize(report)
    logger.info(line)
    if verbose:
        print(line)
    return report


def _base_of(module):
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def summarize(report: dict) -> str:
    """The one log line: fused counts per kind, then what took PEFT's path and why."""
    parts, fallbacks = [], []
    for kind, label in (("mlp", "MLPs"), ("qkv", "q/k/v groups"), ("projections", "LoRA projections")):
        entry = report[kind]
        total = entry["fused"] + sum(entry["peft"].values())
        parts.append(f"{entry['fused']}/{total} {label}")
        for reason, count in entry["peft"].items():
            fallbacks.append(f"{count} {label} ({reason})")
    line = "fastlm: fused LoRA on " + ", ".join(parts)
    return line + ("; PEFT's path for " + ", ".join(fallbacks) if fallbacks else "")
