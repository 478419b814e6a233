"""Training batches lengthened to a few sequence lengths, so the decoder layers' CUDA graphs replay.

Why: layer graphs (fastlm/training/layer_graphs.py) are captured per input shape. Batches padded to their longest
example (fastlm's Collator, transformers' and TRL's collators) have a new length almost every step, and a layer
call with an unseen shape runs eagerly, which is host-bound: 230 ms against 132 ms per step at Llama-3.2-1B QLoRA
batch 4 (bench/RESULTS.md run 24). Rounding the length up to a bucket keeps the shapes few.

What the decoder's forward (fastlm/models/causal_lm.py's decoder_forward, bound on the decoder instance under the
LM head) does with a batch of length T whose bucket is T' > T, before the layers run:
    input_ids (B, T)          -> (B, T'): each row's last token repeated
    inputs_embeds (B, T, H)   -> (B, T', H): zeros
    attention_mask (B, T)     -> (B, T'): ones
    position_ids (B, T)       -> (B, T'): each row's last position + 1, + 2, ...
and use_cache=False; after them the hidden states are cut back to T before anything reads them (the loss, the
lm_head, a caller's own loss such as TRL's fused LM head; labels are never touched), as are returned hidden states
and attention weights. Exact: the added positions come after every real one, and causal
attention never lets a position see a later one, so no real position's output changes; their own outputs are
dropped, so their gradients are zero. Ones (not zeros) in the mask keep a batch without padding a batch without padding
(transformers then calls attention with is_causal instead of a mask); continuing positions keep unpacked
position ids unpacked (transformers reads a restart as a packed sequence boundary).

Left-padded batches are left as they are: a padding position before a row's first real token attends to nothing,
transformers then lets it attend to every key (an arbitrary output), and the first real token's label is predicted
from it; more keys would change that arbitrary value, and so the loss. Checking costs one device-to-host read of
the mask's first column per training forward (transformers' own mask creation reads the mask likewise).

Buckets: T rounded up to a multiple of max(MIN_BUCKET_STEP, 2^(ceil(log2 T) - 1) / BUCKETS_PER_OCTAVE), so four
lengths per doubling (1024 < T <= 2048: 1280, 1536, 1792, 2048), at most 25% padding and 64-token multiples.
The padding is computed (up to 25% more decoder work on a batch just past a bucket) but the loss's lm_head is not.

When: FASTLM_LENGTH_BUCKETS = "auto" (default: when the model's decoder layers run under fastlm's offloaded
checkpointing with CUDA graphs and can be graphed (no dropout), in training, with grad, on CUDA), "1" (whenever
the decoder trains with grad: also useful to bound the shapes torch.compile sees), "0" (never). The batch is left
as it is when the forward gets a tensor argument the padding does not know (a cache, cache_position, a 4-D mask,
flash-attention varlen tensors...) or asks for a tuple (return_dict=False, as an argument or in the config).
"""
import math
import os
from typing import Optional

import torch

SWITCH = "FASTLM_LENGTH_BUCKETS"
# Four buckets per doubling: at most 25% padding (a batch one token past a bucket), 9% on average for lengths spread
# evenly over 256-2048. Measured on the H200 (bench/RESULTS.md run 42, Llama-3.2-1B QLoRA batch 4, 100 steps of
# lengths drawn from 256-2048): 2 per octave pads 17% and pays 7.0 s of first-time captures, 4 pads 9% (~6 ms less
# per step) for 14.7 s, 8 pads 4.5% for 20.8 s and 0.3 GiB more graph pool; 4 wins from ~1,300 steps on.
BUCKETS_PER_OCTAVE = 4
MIN_BUCKET_STEP = 64     # buckets are multiples of 64 tokens (the attention kernels' tile)
PADDABLE = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


def setting() -> str:
    """FASTLM_LENGTH_BUCKETS: "auto" (default), "1" or "0"."""
    value = os.environ.get(SWITCH, "auto").strip().lower()
    if value not in ("auto", "1", "0"):
        raise ValueError(f"{SWITCH} must be auto, 1 or 0, got {os.environ[SWITCH]!r}.")
    return value


def bucket_length(length: int) -> int:
    """The bucket a sequence of `length` tokens is padded to (>= length, a multiple of MIN_BUCKET_STEP)."""
    if length <= 0:
        raise ValueError(f"a sequence length must be positive, got {length}")
    step = max(MIN_BUCKET_STEP, 2 ** max(math.ceil(math.log2(length)) - 1, 0) // BUCKETS_PER_OCTAVE)
    return -(-length // step) * step


def _uses_layer_graphs(decoder) -> bool:
    """True when the model's decoder layers are checkpointed by fastlm's OffloadedCheckpoint with CUDA graphs on and
    can be graphed (LayerGraphs.would_graph): not after a failed capture or a refused layer, not with dropout in
    the decoder (never graphed; padding would only cost time, and change which random numbers the dropout masks
    take)."""
    from fastlm.training.checkpointing import checkpointing_module
    from fastlm.training.offload import OffloadedCheckpoint
    module, checkpoint = checkpointing_module(decoder)
    return (isinstance(checkpoint, OffloadedCheckpoint) and checkpoint.graphs is not None
            and checkpoint.graphs.would_graph(module))


def padded_length(decoder, arguments: dict, extra: dict) -> Optional[int]:
    """The length to pad this forward's batch to, or None to leave it as it is.

    Args:
        decoder: the decoder instance (e.g. LlamaModel) whose forward runs.
        arguments: the forward's named arguments.
        extra: its **kwargs (num_items_in_batch and shift_labels, passed on for a loss, are ignored; any other
            tensor, e.g. a flash-attention varlen `cu_seq_lens_q`, leaves the batch as it is).
    """
    mode = setting()
    if mode == "0" or not torch.is_grad_enabled() or not decoder.training:
        return None
    if extra.get("return_dict", getattr(getattr(decoder, "config", None), "return_dict", True)) is False:
        return None  # a tuple comes back: its hidden states and attentions could not be told apart to cut them
    tensors = {name: value for name, value in arguments.items() if isinstance(value, torch.Tensor)}
    if any(name not in PADDABLE for name in tensors):
        return None
    if any(isinstance(value, torch.Tensor) and name not in ("num_items_in_batch", "shift_labels")
           for name, value in extra.items()):
        return None
    if any(where.get(name) is not None for where in (arguments, extra) for name in ("past_key_values", "cache")):
        return None  # named either way (transformers 5.2x renames past_key_values to cache), given either way
    main = tensors.get("input_ids", tensors.get("inputs_embeds"))
    if main is None or main.dim() < 2:
        return None
    mask = tensors.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        return None
    if mode == "auto" and not (main.is_cuda and _uses_layer_graphs(decoder)):
        return None
    length = main.shape[1]
    target = bucket_length(length)
    if target == length:
        return None
    if mask is not None and not bool(mask[:, 0].all()):  # left padding: see the module docstring
        return None
    return target


def batch_length(arguments: dict) -> int:
    """T of the batch: input_ids (B, T) or inputs_embeds (B, T, H)."""
    main = arguments.get("input_ids")
    return (main if main is not None else arguments["inputs_embeds"]).shape[1]


def pad_batch(arguments: dict, target: int) -> dict:
    """The decoder's arguments with every (B, T, ...) tensor lengthened to (B, target, ...) as the module docstring
    says, and use_cache=False (a cache of the padded batch would be of no use); a new dict, the caller's tensors
    are not changed."""
    padded = dict(arguments)
    input_ids = arguments.get("input_ids")
    extra = target - batch_length(arguments)
    if input_ids is not None:
        padded["input_ids"] = torch.cat([input_ids, input_ids[:, -1:].expand(-1, extra)], dim=1)
    embeds = arguments.get("inputs_embeds")
    if embeds is not None:
        padded["inputs_embeds"] = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, *embeds.shape[2:])],
                                            dim=1)
    mask = arguments.get("attention_mask")
    if mask is not None:
        padded["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)
    positions = arguments.get("position_ids")
    if positions is not None:
        steps = torch.arange(1, extra + 1, device=positions.device, dtype=positions.dtype)
        padded["position_ids"] = torch.cat([positions, positions[:, -1:] + steps], dim=1)
    padded["use_cache"] = False
    return padded


def cut_outputs(hidden: torch.Tensor, hidden_states, attentions, length: int):
    """(hidden (B, T, H), hidden_states, attentions) cut back from the padded length T' to T: the final hidden
    states, each returned layer's hidden states (B, T', H) and attention weights (B, n, T', T') (None stays None)."""
    if hidden_states is not None:
        hidden_states = tuple(h[:, :length] for h in hidden_states)
    if attentions is not None:
        attentions = tuple(None if a is None else a[..., :length, :length] for a in attentions)
    return hidden[:, :length], hidden_states, attentions
