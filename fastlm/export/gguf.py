"""GGUF export: Unsloth's `model.save_pretrained_gguf(dir, tokenizer, quantization_method=...)`.

The merged weights (fastlm/export/merge.py: active LoRA updates added, NF4 / int8 bases dequantized) and the
tokenizer, written as one file `<dir>/model.<TYPE>.gguf` that llama.cpp and transformers' GGUF loader read.

Per family, as data (_FAMILIES): llama.cpp's architecture, and whether q / k rows are permuted into llama.cpp's
RoPE layout (its "llama" architecture rotates adjacent pairs of a head's dimensions, transformers the two halves:
llama.cpp's converter permutes the rows, transformers' GGUF loader permutes them back). Covered: llama, mistral,
qwen2, qwen3, RoPE without scaling, and a byte-level BPE tokenizer (tokenizer.ggml.model "gpt2") whose
pre-tokenizer llama.cpp knows by name (_PRE_TOKENIZERS: GPT-2's, Llama 3's, Qwen 2's). Anything else raises
NotImplementedError before a file is written. Tied embeddings are one tensor (token_embd; readers tie the output
layer to it when the file has no output.weight); an output layer trained apart from them is written as its own.

quantization_method: "f32", "f16", "bf16", "q8_0" (matrices quantized by gguf-py, llama.cpp's reference
quantizer; vectors stay f32, as llama.cpp's converter keeps them; a matrix whose rows are not a whole number of
quantization blocks is stored f16), and Unsloth's names "not_quantized" (f16, or bf16 for a bf16 model) and
"fast_quantized" (q8_0). "quantized" / "q4_k_m" and the other k-quants need llama.cpp's own quantizer tool:
NotImplementedError. The file is written in a staging directory and moved into place when complete
(fastlm.loading.atomic.staged_files).
"""
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from fastlm.export.merge import merged_weights, save_dtype
from fastlm.loading.atomic import staged_files
from fastlm.state import base_model_of

logger = logging.getLogger("fastlm")


@dataclass(frozen=True)
class _Family:
    arch: str             # gguf.MODEL_ARCH member name (llama.cpp's architecture)
    permute_qk: bool      # q / k rows into llama.cpp's adjacent-pair RoPE layout


_FAMILIES = {
    "llama": _Family("LLAMA", permute_qk=True),
    "mistral": _Family("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": _Family("QWEN2", permute_qk=False),
    "qwen3": _Family("QWEN3", permute_qk=False),
}
# tokenizer.ggml.pre: llama.cpp's name for a pre-tokenizer, by the regex its tokenizer.json splits with
# (None: the ByteLevel pre-tokenizer's own GPT-2 regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_PRE_TOKENIZERS = {None: "gpt-2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
TYPES = ("f32", "f16", "bf16", "q8_0")
_ALIASES = {"fast_quantized": "q8_0"}  # and "not_quantized": the model's 16-bit type (_type_name)
_NOT_BUILT = ("quantized", "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k", "iq4_xs")


def save_pretrained_gguf(model, save_directory: str, tokenizer=None, quantization_method: str = "fast_quantized",
                         push_to_hub: bool = False, is_main_process: bool = True, **unsupported) -> str:
    """Write `model` (LoRA merged) and `tokenizer` as `<save_directory>/model.<TYPE>.gguf`; returns its path.

    Args:
        save_directory: created if missing; other files in it are kept, an earlier file of the same name replaced.
        tokenizer: required (a GGUF file carries its vocabulary); a fast byte-level BPE tokenizer.
        quantization_method: "f32", "f16", "bf16", "q8_0", "not_quantized" or "fast_quantized" (module docstring).
        push_to_hub: not built (NotImplementedError). is_main_process: False writes nothing (returns the path).
    Raises:
        TypeError: an argument this function does not take, or no tokenizer.
        ValueError: an unknown quantization_method; a tokenizer with more tokens than the model has rows.
        NotImplementedError: k-quants, push_to_hub, a family / tokenizer / RoPE scaling the module does not cover.
    """
    if unsupported:
        raise TypeError(f"save_pretrained_gguf does not take {sorted(unsupported)}; it takes save_directory, "
                        "tokenizer, quantization_method, push_to_hub, is_main_process.")
    if quantization_method in _NOT_BUILT:
        raise NotImplementedError(f"quantization_method={quantization_method!r} needs llama.cpp's quantizer, not "
                                  "built into fastlm: write 'f16' here and run llama.cpp's llama-quantize on it.")
    type_name = _type_name(model, quantization_method)
    if push_to_hub:
        raise NotImplementedError("push_to_hub is not built in fastlm yet: save to a directory, then upload it with "
                                  "huggingface_hub.HfApi().upload_folder(folder_path=..., repo_id=...).")
    if tokenizer is None:
        raise TypeError("save_pretrained_gguf needs the tokenizer: a GGUF file carries the vocabulary.")
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    path = os.path.join(save_directory, f"model.{qtype.name}.gguf")
    base = base_model_of(model)
    family = _family(base.config)
    vocab_size = base.get_input_embeddings().weight.shape[0]
    tokens = _tokenizer_fields(tokenizer, vocab_size)  # checked before anything is written
    if not is_main_process:
        return path
    with staged_files(save_directory) as staging:
        # use_temp_file: tensors wait in a temporary file, not in memory, until the header is written
        writer = gguf.GGUFWriter(os.path.join(staging, os.path.basename(path)),
                                 gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]], use_temp_file=True)
        _add_model_fields(writer, base.config, vocab_size, qtype)
        _add_tokenizer_fields(writer, tokens)
        written = set()
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], base.config.num_hidden_layers)
        for key, tensor in merged_weights(model, torch.float32, written):
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise NotImplementedError(f"{key} has no GGUF name in llama.cpp's {family.arch.lower()} layout.")
            data = tensor.float().cpu().numpy()
            if family.permute_qk and name.split(".")[-2] in ("attn_q", "attn_k"):
                heads = base.config.num_attention_heads
                data = _adjacent_pairs(data, heads if "attn_q" in name else (base.config.num_key_value_heads or heads))
            _add_tensor(writer, name, data, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _type_name(model, method: str) -> str:
    if method == "not_quantized":
        return "bf16" if save_dtype(model) == torch.bfloat16 else "f16"
    method = _ALIASES.get(method, method)
    if method not in TYPES:
        raise ValueError(f"quantization_method must be one of {', '.join(TYPES)}, 'not_quantized' or "
                         f"'fast_quantized', got {method!r}.")
    return method


def _family(config) -> _Family:
    family = _FAMILIES.get(config.model_type)
    if family is None:
        raise NotImplementedError(f"GGUF export of {config.model_type} models is not built in fastlm (covered: "
                                  f"{', '.join(_FAMILIES)}); save_pretrained_merged writes a checkpoint that "
                                  "llama.cpp's convert_hf_to_gguf.py converts.")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"GGUF export with RoPE scaling ({rope.get('rope_type')}) is not built in fastlm "
                                  "(a max_seq_length beyond the model's positions stretches RoPE).")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        logger.warning("fastlm: llama.cpp's %s architecture has no sliding window: beyond %d tokens the GGUF model "
                       "attends further back than this one.", family.arch.lower(), window)
    return family


def _add_model_fields(writer, config, vocab_size: int, qtype) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    # A Mistral file is a "llama" one (llama.cpp's converter writes it so; transformers 5.24's GGUF loader reads it
    # as Llama: its Mistral path, taken for a file named exactly "mistral", fails with gguf 0.19)
    writer.add_name(os.path.basename(str(getattr(config, "_name_or_path", "") or "").rstrip("/")) or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype.name])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _adjacent_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """q or k weight (heads * D, K) (or bias (heads * D,)) with each head's rows [first half | second half] reordered
    as pairs (row i of the first half, row i of the second): the layout llama.cpp's "llama" RoPE rotates."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _add_tensor(writer, name: str, data: np.ndarray, qtype) -> None:
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


@dataclass
class _Tokens:
    tokens: list
    types: list
    merges: list
    pre: str
    special_ids: dict     # "bos" / "eos" / "unk" / "pad" -> id, those the tokenizer has
    add_bos: bool
    chat_template: object


def _tokenizer_fields(tokenizer, vocab_size: int) -> _Tokens:
    """The vocabulary as llama.cpp's "gpt2" tokenizer model describes it, one token per embedding row."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError("GGUF export needs a fast tokenizer (tokenizer.json), got "
                                  f"{type(tokenizer).__name__}.")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    parts = _parts(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not parts or parts[-1].get("type") != "ByteLevel" \
            or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotImplementedError("GGUF export covers byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2 style); this "
                                  f"one is a {model.get('type')} tokenizer with pre-tokenizer "
                                  f"{data.get('pre_tokenizer')}.")
    pre = _PRE_TOKENIZERS.get(_split_regex(parts))
    if pre is None:
        raise NotImplementedError(f"GGUF export: llama.cpp has no name fastlm knows for this pre-tokenizer "
                                  f"({data.get('pre_tokenizer')}); covered: {', '.join(_PRE_TOKENIZERS.values())}.")
    tokens, types = [None] * vocab_size, [gguf.TokenType.UNUSED] * vocab_size
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()] + [
        (a["id"], a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
        for a in data.get("added_tokens", [])]
    for index, token, kind in entries:
        if index >= vocab_size:
            raise ValueError(f"the tokenizer has token id {index} ({token!r}) but the model only {vocab_size} "
                             "embedding rows; resize the model (resize_model_vocab) or use its own tokenizer.")
        tokens[index], types[index] = token, kind
    tokens = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    bos = ids["bos"]
    with_specials = tokenizer("a")["input_ids"]
    add_bos = bos is not None and with_specials[:1] == [bos] and tokenizer("a", add_special_tokens=False)[
        "input_ids"][:1] != [bos]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return _Tokens(tokens, [int(t) for t in types], merges, pre, {k: v for k, v in ids.items() if v is not None},
                   add_bos, getattr(tokenizer, "chat_template", None))


def _parts(pre_tokenizer) -> list:
    if not pre_tokenizer:
        return []
    return pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]


def _split_regex(parts: list):
    """None for a lone ByteLevel splitting by its own GPT-2 regex; the Split regex before a regex-free ByteLevel;
    else a marker no table entry has."""
    if len(parts) == 1 and parts[0].get("use_regex", True):
        return None
    if len(parts) == 2 and parts[0].get("type") == "Split" and not parts[1].get("use_regex", True) \
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert", False):
        return (parts[0].get("pattern") or {}).get("Regex")
    return "unknown"


def _add_tokenizer_fields(writer, tokens: _Tokens) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokens.pre)
    writer.add_token_list(tokens.tokens)
    writer.add_token_types(tokens.types)
    writer.add_token_merges(tokens.merges)
    for name, index in tokens.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(index)
    writer.add_add_bos_token(tokens.add_bos)
    if isinstance(tokens.chat_template, str):
        writer.add_chat_template(tokens.chat_template)
