"""LoRA through PEFT: the work behind FastLanguageModel.get_peft_model."""
import dataclasses
import logging
from typing import Optional, Union

import torch

from fastlm.models.registry import DEFAULT_TARGET_MODULES
from fastlm.state import state_of
from fastlm.training.checkpointing import check_mode, set_gradient_checkpointing
from fastlm.patching import fast_path_wanted
from fastlm.training.fused_lora import install_fused_lora

logger = logging.getLogger("fastlm")

EMBEDDING_MODULES = ("embed_tokens", "lm_head")
_BIAS = ("none", "all", "lora_only")
# Submodule names PEFT creates inside its wrappers.
_PEFT_INTERNAL = {"base_layer", "original_module", "modules_to_save", "lora_A", "lora_B", "lora_embedding_A",
                  "lora_embedding_B", "lora_dropout", "lora_magnitude_vector"}
# Settings compared when get_peft_model meets a model that already has an adapter.
_COMPARED = ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "target_modules", "modules_to_save")


def prepare_for_adapters(model, use_gradient_checkpointing) -> None:
    """Freeze the base model and set up checkpointing for adapter training.

    Unlike peft.prepare_model_for_kbit_training this does not upcast every non-quantized weight to fp32
    (for a 1B model that is 2.1 GB of embeddings alone); the adapters and trained modules are made fp32 instead.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    set_gradient_checkpointing(model, use_gradient_checkpointing)


def _check_number(name, value, low, low_inclusive, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    below = value < low if low_inclusive else value <= low
    if below or (high is not None and value >= high):
        bounds = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bounds}, got {value!r}.")


def _module_leaf_names(model) -> list:
    """Leaf names of the modules LoRA can target (linear layers and embeddings), e.g. q_proj, lm_head.

    On a model PEFT already wrapped, the wrappers (LoRA layers, ModulesToSaveWrapper) stand for their modules."""
    names = set()
    for full_name, module in model.named_modules():
        wrapped = hasattr(module, "base_layer") or hasattr(module, "original_module")
        inside_wrapper = any(part in _PEFT_INTERNAL for part in full_name.split("."))
        if inside_wrapper:
            continue
        if wrapped or isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or "Linear" in type(module).__name__:
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def split_targets(model, target_modules, spec):
    """(LoRA targets, fully trained embedding modules) from Unsloth-style `target_modules`.

    "all-linear" passes through to PEFT. Names map onto the family's own (Phi-3's fused qkv_proj / gate_up_proj);
    a name the model lacks raises ValueError listing the names it has.
    """
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"target_modules must be a list of module names or \"all-linear\", "
                             f"got {target_modules!r}.")
        return "all-linear", []
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a list of module names, got {target_modules!r}.")
    if not target_modules:
        raise ValueError("target_modules is empty; name at least one module, e.g. [\"q_proj\", \"v_proj\"].")
    wanted = spec.lora_targets(target_modules) if spec is not None else list(dict.fromkeys(target_modules))
    embeddings = [t for t in wanted if t in EMBEDDING_MODULES]
    lora = [t for t in wanted if t not in EMBEDDING_MODULES]
    available = _module_leaf_names(model)
    missing = [t for t in lora + embeddings if t not in available]
    if missing:
        raise ValueError(f"target_modules {missing} not found in {type(model).__name__}; its linear and embedding "
                         f"modules are: {', '.join(available)}.")
    return lora, embeddings


def _lora_config_fields():
    from peft import LoraConfig
    return {f.name for f in dataclasses.fields(LoraConfig) if f.init}


def _describe(config) -> dict:
    described = {}
    for key in _COMPARED:
        value = getattr(config, key, None)
        described[key] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return described


def add_lora(model, r: int, target_modules, lora_alpha: float, lora_dropout: float, bias: str,
             use_gradient_checkpointing, random_state: int, use_rslora: bool, loftq_config: Optional[dict],
             modules_to_save: Optional[list], kwargs: dict):
    """See FastLanguageModel.get_peft_model."""
    import peft
    from peft import LoraConfig, PeftModel

    _check_number("r", r, 0, False)
    if not isinstance(r, int):
        raise TypeError(f"r must be an integer, got {r!r}.")
    _check_number("lora_alpha", lora_alpha, 0, False)
    _check_number("lora_dropout", lora_dropout, 0, True, 1)
    if bias not in _BIAS:
        raise ValueError(f"bias must be one of {', '.join(_BIAS)}, got {bias!r}.")
    check_mode(use_gradient_checkpointing)
    if isinstance(random_state, bool) or not isinstance(random_state, int):
        raise TypeError(f"random_state must be an integer, got {random_state!r}.")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be True or False, got {use_rslora!r}.")
    if modules_to_save is not None and (isinstance(modules_to_save, str) or
                                        not all(isinstance(m, str) for m in modules_to_save)):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}.")
    unknown = sorted(set(kwargs) - _lora_config_fields())
    if unknown:
        raise TypeError(f"get_peft_model got unexpected arguments {unknown}; extra keyword arguments must be "
                        "peft.LoraConfig fields (e.g. layers_to_transform, init_lora_weights, use_dora).")
    task_type = kwargs.pop("task_type", "CAUSAL_LM")
    if str(getattr(task_type, "value", task_type)) != "CAUSAL_LM":
        raise ValueError(f"task_type={task_type!r}: FastLanguageModel trains causal LMs; leave task_type out.")

    state = state_of(model)
    if state is not None and state.precision.mode == "full":
        print("fastlm: the model was loaded with full_finetuning=True, so every weight already trains; "
              "get_peft_model returns it unchanged (load without full_finetuning to train LoRA adapters).")
        return model
    spec = state.spec if state is not None else None
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    lora_targets, embedding_targets = split_targets(base, target_modules, spec)
    trained_fully = list(dict.fromkeys(list(modules_to_save or []) + embedding_targets))
    tied = bool(getattr(base.config, "tie_word_embeddings", False)) and \
        base.get_output_embeddings() is not None and \
        base.get_output_embeddings().weight is base.get_input_embeddings().weight
    if tied and any(m in EMBEDDING_MODULES for m in trained_fully):
        # One matrix serves both ends: train both copies and keep them tied.
        trained_fully = list(dict.fromkeys(trained_fully + list(EMBEDDING_MODULES)))
        kwargs.setdefault("ensure_weight_tying", True)

    init = kwargs.pop("init_lora_weights", True)
    if loftq_config:
        if state is not None and state.precision.quantized:
            raise ValueError("loftq_config initialises LoRA from the 16-bit weights and quantizes them itself; load "
                             "with load_in_16bit=True (or load_in_4bit=False) to use it.")
        if not torch.cuda.is_available():
            raise ValueError("loftq_config needs a CUDA GPU: PEFT's LoftQ initialisation runs there. On a CPU, leave "
                             "loftq_config out (or use init_lora_weights=\"pissa\").")
        loftq_config = peft.LoftQConfig(**loftq_config) if isinstance(loftq_config, dict) else loftq_config
        init = "loftq"
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                        target_modules=lora_targets, use_rslora=use_rslora, modules_to_save=list(trained_fully) or None,
                        init_lora_weights=init, loftq_config=loftq_config or {}, **kwargs)

    requested = _describe(config)  # before PEFT rewrites modules_to_save for tied weights
    if isinstance(model, PeftModel):
        existing = getattr(model, "fastlm_lora_settings", None) or _describe(model.peft_config[model.active_adapter])
        if existing == requested:
            print("fastlm: the model already has this LoRA adapter; returning it unchanged.")
            return model
        raise ValueError(f"The model already has a LoRA adapter with other settings ({existing}); asked for "
                         f"{requested}. Load the base model again to add a different adapter.")

    torch.manual_seed(random_state)
    if state is not None:
        state.use_gradient_checkpointing = use_gradient_checkpointing
    prepare_for_adapters(model, use_gradient_checkpointing)
    fp32_trainable = state.precision.fp32_trainable if state is not None else True
    peft_model = peft.get_peft_model(model, config, autocast_adapter_dtype=fp32_trainable)
    if fp32_trainable:
        _upcast_trained_modules(peft_model, trained_fully)
    peft_model.fastlm_lora_settings = requested
    peft_model.print_trainable_parameters()
    install_fused_lora_if_wanted(peft_model, spec)
    return peft_model


def install_fused_lora_if_wanted(peft_model, spec) -> None:
    """Fused MLP / q,k,v / projections where PEFT's path is not needed, when the fast path is wanted for the base
    model (on CUDA by default; FASTLM_FAST_PATH=1/0 forces it). spec: the family's ModelSpec, or None."""
    if fast_path_wanted(peft_model.get_base_model()):
        state = state_of(peft_model)
        install_fused_lora(peft_model, mlp_feeds_residual=spec is not None and spec.mlp_feeds_residual,
                           tiled_mlp=state is not None and state.tiled_mlp)


def _upcast_trained_modules(peft_model, names) -> None:
    """Keep fully trained 16-bit modules (embed_tokens, lm_head, ...) in fp32, converting at their boundaries.

    An fp32 embedding's output is cast back to the model's dtype, and an fp32 lm_head's input up to fp32, so the
    16-bit layers in between see the dtype they expect with or without autocast; logits come out in fp32.
    """
    from peft.utils import ModulesToSaveWrapper

    # Collect first: tied copies share one Parameter, and upcasting one changes the other's dtype too.
    sixteen_bit = []
    for full_name, module in peft_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and full_name.rsplit(".", 1)[-1] in names:
            for trained in module.modules_to_save.values():
                weight = getattr(trained, "weight", None)
                if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
                    sixteen_bit.append((trained, weight.dtype))
    for trained, model_dtype in sixteen_bit:
        trained.float()
        if isinstance(trained, torch.nn.Embedding):
            trained.register_forward_hook(lambda mod, args, out, dt=model_dtype: out.to(dt))
        else:
            trained.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.float32),) + tuple(args[1:]))
