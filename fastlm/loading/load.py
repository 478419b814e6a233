"""Load a model and tokenizer for fine-tuning: the work behind FastLanguageModel.from_pretrained."""
import glob
import json
import logging
import os
import random
from typing import Optional

import numpy as np
import torch

from fastlm.loading.config import load_config, stretch_context
from fastlm.loading.gguf import checkpoint_from_gguf
from fastlm.loading.host_weights import keep_input_embedding_on_host, keep_output_layer_on_host
from fastlm.loading.precision import Precision, choose_precision
from fastlm.loading.resolve import resolve_source
from fastlm.loading.tokenizer import fix_tokenizer as fix_tokenizer_for_training
from fastlm.loading.tokenizer import sync_special_tokens
from fastlm.models.registry import spec_for
from fastlm.state import ATTRIBUTE, FastLMState
from fastlm.training.checkpointing import check_mode, set_gradient_checkpointing

logger = logging.getLogger("fastlm")

# from_pretrained keyword arguments that fastlm sets itself from its own arguments.
_OWNED_KWARGS = {"dtype": "dtype", "torch_dtype": "dtype", "quantization_config": "load_in_4bit / load_in_8bit",
                 "config": "rope_scaling / max_seq_length", "load_in_4bit": "load_in_4bit",
                 "load_in_8bit": "load_in_8bit"}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"random_state must be an integer, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model_and_tokenizer(model_name, max_seq_length: int, dtype, load_in_4bit: bool, load_in_8bit: bool,
                             load_in_16bit: bool, full_finetuning: bool, token: Optional[str], device_map,
                             rope_scaling: Optional[dict], fix_tokenizer: bool, trust_remote_code: bool,
                             use_gradient_checkpointing, resize_model_vocab: Optional[int], revision: Optional[str],
                             float32_mixed_precision: Optional[bool], random_state: int, explicit: frozenset,
                             model_kwargs: dict, tiled_mlp: bool = False, offload_embedding: bool = False,
                             offload_lm_head: bool = False):
    """See FastLanguageModel.from_pretrained. Returns (model, tokenizer); an adapter loads as a PeftModel."""
    check_mode(use_gradient_checkpointing)
    for key in model_kwargs:
        if key in _OWNED_KWARGS:
            raise ValueError(f"Do not pass {key}= to from_pretrained; fastlm sets it from its "
                             f"{_OWNED_KWARGS[key]} argument.")
    if resize_model_vocab is not None and (not isinstance(resize_model_vocab, int) or resize_model_vocab <= 0):
        raise ValueError(f"resize_model_vocab must be a positive integer, got {resize_model_vocab!r}.")
    seed_everything(random_state)

    source = resolve_source(model_name, token=token, revision=revision, trust_remote_code=trust_remote_code)
    adapter_dir = None
    if source.kind == "adapter":
        adapter_dir = source.path
        source = resolve_source(source.base_model, token=token, revision=None, trust_remote_code=trust_remote_code)
        if source.kind == "adapter":
            raise ValueError(f"The adapter '{adapter_dir}' names another adapter as its base; fastlm loads one level.")
    checkpoint = checkpoint_from_gguf(source.path) if source.kind == "gguf" else source.path

    config = load_config(checkpoint, trust_remote_code)
    spec = spec_for(config.model_type)
    if spec is None:
        logger.warning("fastlm: no fast path for model_type %r; it loads and trains through plain transformers.",
                       config.model_type)
    on_cuda = torch.cuda.is_available()
    precision = choose_precision(load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning, dtype,
                                 float32_mixed_precision, explicit, on_cuda)
    prequantized = _prequantized_mode(config)
    if prequantized is not None:
        if precision.mode in ("16bit", "full") and ("load_in_16bit" in explicit or full_finetuning):
            raise ValueError(f"'{checkpoint}' is already quantized to {prequantized} with bitsandbytes and cannot be "
                             "loaded unquantized; use the original 16-bit checkpoint for 16-bit LoRA or full "
                             "fine-tuning.")
        precision = Precision(prequantized, precision.dtype, precision.fp32_trainable)
    if tiled_mlp and (precision.mode == "full" or spec is None):
        raise ValueError("unsloth_tiled_mlp=True tiles the MLPs of fastlm's fused LoRA, which "
                         + ("full fine-tuning does not use (no LoRA)" if precision.mode == "full" else
                            f"model_type {config.model_type!r} does not have (no fast path)")
                         + "; leave unsloth_tiled_mlp=False (gradient checkpointing saves activation memory).")
    for name, wanted in (("offload_embedding", offload_embedding), ("offload_lm_head", offload_lm_head)):
        if wanted and precision.mode == "full":
            raise ValueError(f"{name}=True keeps a frozen embedding matrix in host memory, but full_finetuning=True "
                             f"trains it; use LoRA (full_finetuning=False) or leave {name}=False.")
    stretch_context(config, max_seq_length, rope_scaling)
    _check_weight_files(checkpoint)

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, config=config, dtype=precision.weights_dtype,
        quantization_config=None if prequantized else precision.quantization_config(),
        device_map=_device_map(device_map, on_cuda), trust_remote_code=trust_remote_code, **model_kwargs)
    tokenizer = _load_tokenizer(adapter_dir, checkpoint, trust_remote_code)
    _keep_cpu_4bit_weights_differentiable(model)

    if resize_model_vocab is not None:
        model.resize_token_embeddings(resize_model_vocab)
    elif len(tokenizer) > model.get_input_embeddings().num_embeddings:  # an adapter's tokenizer with added tokens
        model.resize_token_embeddings(len(tokenizer))
    if fix_tokenizer:
        fix_tokenizer_for_training(tokenizer, model, max_seq_length)
    else:
        tokenizer.model_max_length = max_seq_length
        if tokenizer.pad_token is not None:
            sync_special_tokens(tokenizer, model)
    if offload_embedding:  # after every resize above (a resized matrix is a new device tensor)
        keep_input_embedding_on_host(model, output_streamed=offload_lm_head)
    if offload_lm_head:
        keep_output_layer_on_host(model)
    if (offload_embedding or offload_lm_head) and torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the moved matrices' device memory back, or it stays reserved by this process
    model.max_seq_length = max_seq_length
    if spec is not None:  # kernels on this instance only (tests/test_patching.py proves parity per family)
        from fastlm.patching import apply_fast_path, fast_path_wanted
        if fast_path_wanted(model):
            apply_fast_path(model, spec)
        elif tiled_mlp:
            raise ValueError("unsloth_tiled_mlp=True tiles the MLPs of fastlm's fused LoRA, which is off for this "
                             "model: it runs on CUDA by default; set FASTLM_FAST_PATH=1 to use it elsewhere, or "
                             "leave unsloth_tiled_mlp=False.")
    setattr(model, ATTRIBUTE, FastLMState(precision, spec, max_seq_length, use_gradient_checkpointing,
                                          random_state, tokenizer, tiled_mlp))

    if precision.mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        set_gradient_checkpointing(model, use_gradient_checkpointing)
    if adapter_dir is not None:
        from peft import PeftModel
        from fastlm.training.lora import install_fused_lora_if_wanted, prepare_for_adapters
        prepare_for_adapters(model, use_gradient_checkpointing)
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        if spec is not None:  # as get_peft_model does
            install_fused_lora_if_wanted(model, spec)
    return model, tokenizer


def _keep_cpu_4bit_weights_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weight in place the first time the module runs in eval mode on a
    CPU with AVX512-BF16, and from then on multiplies with a kernel that has no backward: after an evaluation,
    training silently loses the gradient through every frozen 4-bit weight. The switch is an attribute of each
    module instance; turning it off costs CPU generation speed, never correctness.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _prequantized_mode(config) -> Optional[str]:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    if quantization.get("quant_method") != "bitsandbytes":
        raise ValueError(f"The checkpoint is quantized with {quantization.get('quant_method')!r}; fastlm loads "
                         "16-bit checkpoints and bitsandbytes 4-bit/8-bit ones.")
    return "4bit" if quantization.get("load_in_4bit") else "8bit"


def _check_weight_files(checkpoint: str) -> None:
    """Fail early, naming the file, when a safetensors file is missing, truncated or not safetensors."""
    from safetensors import safe_open

    index_file = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(checkpoint, name))]
        if missing:
            raise FileNotFoundError(f"'{checkpoint}' is missing weight shards listed in its index: "
                                    f"{', '.join(missing)}. Download or save the checkpoint again.")
        paths = [os.path.join(checkpoint, name) for name in files]
    else:
        paths = sorted(glob.glob(os.path.join(checkpoint, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"'{checkpoint}' has a config.json but no .safetensors weights; save the model "
                                "with save_pretrained (safe_serialization) or convert its .bin files.")
    for path in paths:
        try:
            with safe_open(path, framework="pt") as handle:
                keys = list(handle.keys())
            size = os.path.getsize(path)
            # The header states where the data ends; a truncated file ends before that.
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size < 8 + header_len + end:
                raise ValueError(f"file is {size} bytes, its header needs {8 + header_len + end}")
        except Exception as err:
            raise OSError(f"Weight file '{path}' is damaged ({type(err).__name__}: {err}); download or save the "
                          "checkpoint again.") from None
        if not keys:
            raise OSError(f"Weight file '{path}' holds no tensors; download or save the checkpoint again.")


def _device_map(device_map, on_cuda: bool):
    """Unsloth's default "sequential" fills GPU 0 first; without a GPU every placement strategy means the CPU.
    Under torch.distributed (LOCAL_RANK set), the default places the whole model on this rank's GPU."""
    if not on_cuda:
        return "cpu" if device_map in ("sequential", "auto", "balanced", "balanced_low_0", None) else device_map
    if device_map == "sequential" and "LOCAL_RANK" in os.environ:
        return {"": int(os.environ["LOCAL_RANK"])}
    return device_map


def _load_tokenizer(adapter_dir: Optional[str], checkpoint: str, trust_remote_code: bool):
    """The adapter's tokenizer when it saved one (it may hold added tokens), else the checkpoint's."""
    from transformers import AutoTokenizer

    for path in (adapter_dir, checkpoint):
        if path and any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                         "tokenizer.model")):
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    raise FileNotFoundError(f"'{checkpoint}' has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "save the tokenizer beside the model with tokenizer.save_pretrained.")
