"""How the weights are held: dtype, quantization, and which parameters train.

Modes:
    "4bit"  NF4 with double quantization, compute dtype = dtype (QLoRA). Embeddings and lm_head stay unquantized.
    "8bit"  LLM.int8 (bitsandbytes Linear8bitLt), lm_head unquantized.
    "16bit" no quantization; weights in `dtype` (LoRA on a 16-bit base; fp32 on a CPU).
    "full"  no quantization; every parameter trains (full fine-tuning).
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch

_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
                "float": torch.float32}


@dataclass(frozen=True)
class Precision:
    mode: str
    dtype: torch.dtype     # compute dtype, and the dtype of frozen unquantized weights
    fp32_trainable: bool   # trained parameters (full FT: all weights; LoRA: adapters) kept in fp32

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the checkpoint's unquantized weights are loaded in."""
        return torch.float32 if self.mode == "full" and self.fp32_trainable else self.dtype

    @property
    def quantized(self) -> bool:
        return self.mode in ("4bit", "8bit")

    def quantization_config(self):
        """A transformers BitsAndBytesConfig for the quantized modes, else None."""
        if not self.quantized:
            return None
        from transformers import BitsAndBytesConfig
        if self.mode == "4bit":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=self.dtype)
        return BitsAndBytesConfig(load_in_8bit=True)


def resolve_dtype(dtype: Union[None, str, torch.dtype], on_cuda: bool) -> torch.dtype:
    """`dtype=None` means bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if dtype is None:
        if not on_cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype='{dtype}' is not understood; use torch.bfloat16, torch.float16, torch.float32 "
                             "or one of the strings 'bfloat16', 'float16', 'float32' (or None for automatic).")
        dtype = _DTYPE_NAMES[name]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype={dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32.")
    if dtype == torch.bfloat16 and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype=bfloat16 was asked for, but this GPU does not support bfloat16; use "
                         "dtype=torch.float16 (or None to choose automatically).")
    return dtype


def choose_precision(load_in_4bit: bool, load_in_8bit: bool, load_in_16bit: bool, full_finetuning: bool,
                     dtype: Union[None, str, torch.dtype], float32_mixed_precision: Optional[bool],
                     explicit: frozenset, on_cuda: bool) -> Precision:
    """Pick the mode from the flags.

    `load_in_4bit=True` is the default, so it yields to any other mode flag the caller set; a `load_in_4bit=True`
    the caller wrote out (named in `explicit`) together with another mode is a conflict, as are two other
    modes together (except full fine-tuning with `load_in_16bit`, which says the same thing twice).

    `float32_mixed_precision`: True keeps the trained parameters in fp32 (full fine-tuning: every weight, as
    master weights computed under the trainer's autocast; LoRA: the adapters); False keeps them in `dtype`.
    None means: LoRA adapters in fp32 (PEFT's default), full fine-tuning in fp32 only when `dtype` is float16,
    whose range is too small for weight updates.
    """
    for name, value in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit),
                        ("load_in_16bit", load_in_16bit), ("full_finetuning", full_finetuning)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    set_flags = [name for name, value in (("load_in_4bit", load_in_4bit and "load_in_4bit" in explicit),
                                          ("load_in_8bit", load_in_8bit), ("load_in_16bit", load_in_16bit),
                                          ("full_finetuning", full_finetuning)) if value]
    if "full_finetuning" in set_flags and "load_in_16bit" in set_flags:
        set_flags.remove("load_in_16bit")  # full fine-tuning is 16-bit already
    if len(set_flags) > 1:
        raise ValueError(f"{set_flags[0]}=True and {set_flags[1]}=True conflict: choose one way to hold the "
                         "weights and set the other to False.")
    compute = resolve_dtype(dtype, on_cuda)
    if full_finetuning:
        fp32 = float32_mixed_precision if float32_mixed_precision is not None else compute == torch.float16
        return Precision("full", compute, fp32_trainable=fp32)
    if load_in_8bit:
        mode = "8bit"
    elif load_in_16bit:
        mode = "16bit"
    elif load_in_4bit:
        mode = "4bit"
    else:
        mode = "16bit"  # every quantization flag False: the unquantized model, as Unsloth loads it
    fp32 = True if float32_mixed_precision is None else float32_mixed_precision
    return Precision(mode, compute, fp32_trainable=fp32)
