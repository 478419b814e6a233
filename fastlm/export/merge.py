"""Saving a trained model for inference elsewhere: Unsloth's `model.save_pretrained_merged(dir, tokenizer, ...)`.

save_method:
    "merged_16bit"  one plain transformers checkpoint: every weight dense (NF4 and int8 base weights dequantized as
                    bitsandbytes does), each active LoRA's update scaling * B @ A added in fp32 and the sum rounded
                    once to the model's dtype (bf16 / fp16; fp32 for a model loaded in fp32), no quantization_config.
                    AutoModelForCausalLM.from_pretrained(dir) (and vLLM) load it without PEFT or bitsandbytes.
    "lora"          the adapter alone, as PEFT's save_pretrained writes it (adapter_config.json +
                    adapter_model.safetensors).
    "merged_4bit_forced"  the merged_16bit checkpoint quantized to NF4 (double quantization, the model's dtype as
                    compute dtype, as from_pretrained(load_in_4bit=True) holds weights) by transformers + bitsandbytes
                    on the model's device, saved with its quantization_config: from_pretrained(dir) loads it in 4-bit.
                    Needs room for the 4-bit copy beside the model. Lossy: merge to 16-bit for anything derived later.
    "merged_4bit"   refused (ValueError), as Unsloth does: say merged_4bit_forced to mean it.

Nothing of the model changes (the LoRA layers are not merged in place: training can go on). The files are written
into a staging directory inside `save_directory` and moved in one by one (fastlm.loading.atomic.staged_files;
config.json last), so an interrupted save leaves the files of an earlier one whole, and other files in the
directory are not touched.

Public: save_pretrained_merged(model, ...); merged_weights and save_dtype (also used by fastlm/export/gguf.py).
"""
import copy
import json
import os
import re
import tempfile

import torch
from torch import nn

from fastlm.loading.atomic import staged_files
from fastlm.state import base_model_of, state_of
from fastlm.training.fused_lora import readable_weight

SAVE_METHODS = ("merged_16bit", "lora", "merged_4bit_forced")
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_pretrained_merged(model, save_directory: str, tokenizer=None, save_method: str = "merged_16bit",
                           push_to_hub: bool = False, is_main_process: bool = True,
                           max_shard_size="5GB", safe_serialization: bool = True, **unsupported) -> None:
    """Save `model` (a PeftModel or a model from FastLanguageModel.from_pretrained) and the tokenizer.

    Args:
        save_directory: created if missing. For "merged_16bit" it must not hold a PEFT adapter
            (adapter_config.json: transformers would load that adapter instead of the merged weights).
        tokenizer: saved beside the weights when given.
        save_method: "merged_16bit" (default), "lora" or "merged_4bit_forced"; see the module docstring.
        push_to_hub: not built (NotImplementedError): save, then upload the directory with huggingface_hub.
        is_main_process: False writes nothing (the other ranks of a distributed run).
        max_shard_size: largest safetensors file, bytes or a string such as "5GB", "500MB", "2GiB"; larger
            checkpoints are split into model-0000i-of-0000n.safetensors with model.safetensors.index.json.
        safe_serialization: only True (fastlm writes safetensors).
    Raises:
        TypeError: an argument this function does not take (Unsloth's others: token, state_dict, variant, ...).
        ValueError: an unknown save_method or "merged_4bit" (see above), "lora" without an adapter, a bad
            max_shard_size, an adapter directory.
        NotImplementedError: push_to_hub=True, safe_serialization=False, or a layer fastlm cannot
            merge (DoRA, LoRA on embeddings or convolutions, other PEFT tuners): save_method="lora" saves those.
    """
    if unsupported:
        raise TypeError(f"save_pretrained_merged does not take {sorted(unsupported)}; it takes save_directory, "
                        "tokenizer, save_method, push_to_hub, is_main_process, max_shard_size, safe_serialization.")
    if save_method == "merged_4bit":
        raise ValueError("save_method='merged_4bit' rounds the merged weights to NF4 for good: a GGUF or 16-bit model "
                         "made from it later keeps that loss. Save merged_16bit for those; to save 4-bit anyway, "
                         "say save_method='merged_4bit_forced'.")
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method must be one of {', '.join(SAVE_METHODS)}, got {save_method!r}.")
    if push_to_hub:
        raise NotImplementedError("push_to_hub is not built in fastlm yet: save to a directory, then upload it with "
                                  "huggingface_hub.HfApi().upload_folder(folder_path=..., repo_id=...).")
    if safe_serialization is not True:
        raise NotImplementedError("fastlm saves safetensors only; leave safe_serialization=True.")
    shard_bytes = _size_in_bytes(max_shard_size)
    if save_method == "lora" and not hasattr(model, "peft_config"):
        raise ValueError("save_method='lora' needs a model with a LoRA adapter (FastLanguageModel.get_peft_model); "
                         "use save_method='merged_16bit' to save the whole model.")
    if not is_main_process:
        return
    merged = save_method.startswith("merged")
    if merged and os.path.exists(os.path.join(save_directory, "adapter_config.json")):
        raise ValueError(f"{save_directory} holds a PEFT adapter (adapter_config.json): transformers would load that "
                         "adapter instead of the merged weights. Save the merged model into another directory.")
    with staged_files(save_directory, last=("config.json",)) as staging:
        if save_method == "lora":
            model.save_pretrained(staging)
        elif save_method == "merged_16bit":
            _write_merged(model, staging, shard_bytes)
        else:
            _write_merged_4bit(model, staging, shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        written = set(os.listdir(staging))
    if merged:
        _remove_stale_weights(save_directory, written)


def _size_in_bytes(size) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    if match is None or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size such as '5GB', '500MB', "
                         f"'2GiB', got {size!r}.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _remove_stale_weights(directory: str, written: set) -> None:
    """Remove the weight files of an earlier save that this one (`written`) did not write: a single file after a
    sharded save, or the reverse."""
    for name in os.listdir(directory):
        if (name in (_WEIGHTS, _INDEX) or _SHARD.match(name)) and name not in written:
            os.remove(os.path.join(directory, name))


def merged_weights(model, dtype: torch.dtype, written: set):
    """(key, tensor) of the merged checkpoint, as transformers names them, floating tensors in `dtype`: each LoRA
    layer's merged weight, the active trained copy of each modules_to_save module, quantized weights dense. With
    tie_word_embeddings in the config, the output embedding is left out when it is the input embedding's tensor
    (transformers ties it again when loading). Each key yielded is added to `written`."""
    base = base_model_of(model)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    output_key = _output_weight_key(base)
    input_weight = base.get_input_embeddings().weight if tied else None
    for key, tensor in _merged_tensors(base, dtype):
        if tied and key == output_key and tensor is input_weight:
            continue
        written.add(key)
        yield key, tensor.detach().to(dtype) if tensor.is_floating_point() else tensor


def output_untied(model, written: set) -> bool:
    """Whether the config says tie_word_embeddings but merged_weights wrote the output embedding (trained apart)."""
    base = base_model_of(model)
    return bool(getattr(base.config, "tie_word_embeddings", False)) and _output_weight_key(base) in written


def save_dtype(model) -> torch.dtype:
    """The dtype of a merged checkpoint: the model's compute dtype (bf16 / fp16, fp32 for a model loaded in fp32)."""
    state = state_of(model)
    return state.precision.dtype if state is not None else base_model_of(model).dtype


def _write_merged(model, directory: str, shard_bytes: int) -> None:
    """The merged weights (safetensors, sharded by shard_bytes), config.json and generation_config.json."""
    base = base_model_of(model)
    dtype = save_dtype(model)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        config.architectures = [type(base).__name__]
    try:  # what transformers refuses to write or to load again, refused before the weights take their time
        config.save_pretrained(directory)
        type(config).from_pretrained(directory)
    except Exception as error:
        raise ValueError(f"transformers would not load the merged model's config.json ({error}); nothing was "
                         "written. A max_seq_length beyond max_position_embeddings stretches RoPE linearly, which "
                         "some families' configs refuse (Phi-3's): load with a max_seq_length within the model's "
                         "positions to merge.") from None
    writer, written = _ShardWriter(directory, shard_bytes), set()
    for key, tensor in merged_weights(model, dtype, written):
        writer.add(key, tensor)
    writer.close()
    if output_untied(model, written):  # the output layer was trained apart from the input embedding
        config.tie_word_embeddings = False
        config.save_pretrained(directory)
    if getattr(base, "generation_config", None) is not None and base.can_generate():
        base.generation_config.save_pretrained(directory)


def _write_merged_4bit(model, directory: str, shard_bytes: int) -> None:
    """The merged_16bit checkpoint (in a temporary directory beside) loaded by transformers with fastlm's NF4
    BitsAndBytesConfig on the model's device, saved with transformers' own 4-bit serialization."""
    from transformers import AutoModelForCausalLM

    from fastlm.loading.precision import Precision

    dtype = save_dtype(model)
    device = next(base_model_of(model).parameters()).device
    with tempfile.TemporaryDirectory(prefix=".fastlm-16bit-", dir=directory) as merged_16bit:
        _write_merged(model, merged_16bit, shard_bytes)
        quantized = AutoModelForCausalLM.from_pretrained(
            merged_16bit, dtype=dtype, device_map={"": str(device)},
            quantization_config=Precision("4bit", dtype, fp32_trainable=False).quantization_config())
        quantized.save_pretrained(directory, max_shard_size=shard_bytes)
        del quantized


def _output_weight_key(base) -> str:
    output = base.get_output_embeddings()
    for name, module in base.named_modules():
        if module is output:
            return f"{name}.weight"
    return ""


def _merged_tensors(module: nn.Module, dtype: torch.dtype, prefix: str = ""):
    """(state-dict key as transformers names it, tensor) for every weight of `module` as its forward computes with it
    now: PEFT's wrappers replaced by the merged weight or the active trained copy, quantized weights dense. Merged and
    dequantized weights come in `dtype`; other parameters and persistent buffers as they are (the caller converts
    them, after comparing tied weights by identity)."""
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        yield from _merged_tensors(_active_copy(module, prefix), dtype, prefix)
        return
    if hasattr(module, "base_layer"):  # a PEFT tuner layer
        yield from _merged_lora_linear(module, dtype, prefix)
        return
    if _is_quantized(module):  # a bitsandbytes layer no adapter wraps
        yield f"{prefix}weight", _dense_weight(module, prefix).to(dtype)
        if module.bias is not None:
            yield f"{prefix}bias", module.bias
        return
    for name, tensor in module._parameters.items():
        if tensor is not None:
            yield f"{prefix}{name}", tensor
    for name, tensor in module._buffers.items():
        if tensor is not None and name not in module._non_persistent_buffers_set:
            yield f"{prefix}{name}", tensor
    for name, child in module.named_children():
        yield from _merged_tensors(child, dtype, f"{prefix}{name}.")


def _is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def _dense_weight(linear: nn.Linear, prefix: str) -> torch.Tensor:
    """The weight (N, K) of a plain, NF4 or int8 (bitsandbytes) linear layer in fp32 on its device, a new tensor;
    quantized weights dequantized as bitsandbytes does (fastlm.training.fused_lora.readable_weight)."""
    weight = linear.weight
    if weight.is_floating_point():
        return weight.detach().float().clone()
    dense, why = readable_weight(linear)
    if dense is None:
        raise NotImplementedError(f"{prefix.rstrip('.')}: its {weight.dtype} weight cannot be read as a dense matrix "
                                  f"here ({why}); save the adapter with save_method='lora'.")
    return dense.materialize_into(torch.empty(dense.shape, dtype=torch.float32, device=weight.device))


def _active_copy(wrapper, name: str) -> nn.Module:
    """The module a PEFT ModulesToSaveWrapper runs now: its active trained copy, or the original."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not any(a in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    trained = [a for a in active if a in wrapper.modules_to_save]
    if len(trained) > 1:
        raise NotImplementedError(f"{name.rstrip('.')} has several active trained copies ({trained}); activate "
                                  "one adapter (model.set_adapter) before merging.")
    return wrapper.modules_to_save[trained[0]]


def _merged_lora_linear(layer, dtype: torch.dtype, prefix: str):
    """weight (and bias) of a PEFT LoRA Linear: W + sum over active, unmerged adapters of scaling * B @ A, in fp32,
    rounded once to dtype. W is the base layer's dense weight (NF4 / int8 dequantized)."""
    name = prefix.rstrip(".")
    base = layer.get_base_layer()
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is None or not isinstance(base, nn.Linear):
        raise NotImplementedError(f"{name} is a {type(layer).__name__} over a {type(base).__name__}: fastlm merges "
                                  "LoRA on linear layers only; save it with save_method='lora'.")
    weight = _dense_weight(base, prefix)
    bias = base.bias.detach().float() if base.bias is not None else None
    adapters = [] if layer.disable_adapters else [
        a for a in layer.active_adapters if a in lora_a and a not in layer.merged_adapters]
    for adapter in adapters:
        if layer.use_dora.get(adapter, False):
            raise NotImplementedError(f"{name}: merging DoRA is not built in fastlm; save it with save_method='lora'.")
        a, b, scaling = lora_a[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
        delta = (b.detach().float().to(weight.device) @ a.detach().float().to(weight.device)) * scaling
        weight += delta.T if getattr(layer, "fan_in_fan_out", False) else delta
        lora_bias = layer.lora_B[adapter].bias
        if lora_bias is not None:  # LoraConfig(lora_bias=True)
            bias = (bias if bias is not None else 0) + lora_bias.detach().float().to(weight.device) * scaling
    yield f"{prefix}weight", weight.to(dtype)
    if bias is not None:
        yield f"{prefix}bias", bias.to(dtype)


class _ShardWriter:
    """Writes tensors into safetensors files of at most shard_bytes each (a larger tensor gets a file of its own):
    model.safetensors, or model-0000i-of-0000n.safetensors and model.safetensors.index.json."""

    def __init__(self, directory: str, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.current, self.current_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.shard_bytes:
            self._flush()
        self.current[key] = tensor.detach().to("cpu", copy=True).contiguous()
        self.current_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.files)}.tmp"
        save_file(self.current, os.path.join(self.directory, name), metadata={"format": "pt"})
        self.files.append((name, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(os.path.join(self.directory, self.files[0][0]), os.path.join(self.directory, _WEIGHTS))
            return
        count = len(self.files)
        for i, (name, keys) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, name), os.path.join(self.directory, final))
            self.weight_map.update({key: final for key in keys})
        with open(os.path.join(self.directory, _INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, f, indent=2)
