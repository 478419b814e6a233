"""Causal attention whose output a checkpointed layer's recomputation takes instead of computing it again.

Under offloaded checkpointing (fastlm/training/offload.py) a decoder layer runs twice: its forward without grad,
and in backward a recomputation with grad. There the attention computes its output O again only to build the
autograd graph; its backward needs O and the softmax's log-sum-exp (LSE) besides q, k and v. So here:

    forward pass     O, LSE from the attention kernel's training entry point (the one that returns LSE); both go
                     to the checkpoint (memo[SAVED_FOR_RECOMPUTATION], see fastlm.kernels.lora), which keeps them
                     with the layer's input: in pinned host memory on a GPU, copied back ahead of the
                     recomputation, as the input is
    recomputation    q, k and v recomputed as before (their projections need them for their own gradients); O is
                     the output of _ReusedAttention, a node whose forward returns the saved O as it is and whose
                     backward is the kernel's backward of (dO, q, k, v, O, LSE)

The numbers are the plain path's: the kernel SDPA itself runs there (cuDNN's on the H200 for bf16 without a mask,
bench/RESULTS.md run 75; the CPU's flash kernel), on the same q, k, v (the recomputation's are bit-identical to the
forward's), and that kernel's backward.

Cost and gain (bench/RESULTS.md runs 81-83, Llama-3.2-1B batch 4 x 2048): the recomputation's cuDNN forward is
~190 us of a layer's ~4.6 ms backward; O (32 MiB) and LSE (1 MiB) cost two more copies each way over PCIe
(overlapped, though the backward's GEMMs ran ~66 us per layer slower beside them) and, under the CUDA graphs, ~45
us of device copies per layer in forward (into the static buffers inside the graph, and out after its replay) and
~20 us in backward (back in). Net 1.4-2.3 ms per ~125 ms step in run 83, for 0.06 GiB of peak memory.

Where: inside the offloaded checkpoint's memo, the config's attention implementation "sdpa", no attention mask
(transformers then calls SDPA with is_causal: no padding, no sliding window within reach), no cache, no dropout, no
softcap, q and k of one length > 1; on CUDA in bf16/fp16 where cuDNN's attention takes the shapes, on the CPU in
fp32/bf16. Anything else runs as before; a recomputation that finds nothing saved (a layer run twice before one
backward: the memo then holds the later call's) computes O and LSE itself, at the plain path's cost.

Tensors: query (B, nh, T, hd), key and value (B, nkv, T, hd), nh a multiple of nkv (grouped-query attention); the
output (B, T, nh, hd), kept as is (contiguous); LSE as the kernel returns it (fp32: (B, nh, T) from the CPU's
kernel, (B, nh, T, 1) from cuDNN's).
"""
from typing import Optional

import torch

from fastlm.kernels.lora import SAVED_FOR_RECOMPUTATION, call_index, checkpoint_memo

# Off: the recomputation runs the attention's forward again (bench/train_step.py --recomputed-attention measures it).
ENABLED = True


def _repeat_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, heads, T, hd), each key/value head repeated for its group of query heads."""
    groups = heads // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, nh, T, hd) gradient of repeated heads -> (B, nkv, T, hd), summed over each group."""
    batch, heads, length, dim = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(batch, kv_heads, heads // kv_heads, length, dim).sum(dim=2)


def _backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Optional[str]:
    """"cudnn", "cpu" or None (not covered here)."""
    if query.device.type == "cpu":
        return "cpu" if query.dtype in (torch.float32, torch.bfloat16) else None
    if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    can_use = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    if can_use is None or not torch.backends.cuda.cudnn_sdp_enabled():
        return None
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, True, True)
    except TypeError:  # a torch without grouped-query attention in SDPA's parameters
        return None
    return "cudnn" if can_use(params) else None


def _attention_with_lse(backend: str, query, key, value, scale: float):
    """(O (B, nh, T, hd), LSE, extra): causal attention; extra holds what the backward takes besides them."""
    if backend == "cpu":
        heads = query.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, _repeat_heads(key, heads), _repeat_heads(value, heads), 0.0, True, scale=scale)
        return out, lse, ()
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, True, False, scale=scale)
    return out, lse, (seed, offset, cum_q, cum_k, max_q, max_k)


def _attention_backward(backend: str, grad, query, key, value, out, lse, extra: tuple, scale: float):
    """(dq, dk, dv) of causal attention from its output gradient, inputs, output and LSE."""
    if backend == "cpu":
        heads, kv_heads = query.shape[1], key.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, _repeat_heads(key, heads), _repeat_heads(value, heads), out, lse, 0.0, True, scale=scale)
        return dq, _sum_groups(dk, kv_heads), _sum_groups(dv, kv_heads)
    seed, offset, cum_q, cum_k, max_q, max_k = extra
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad, query, key, value, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, True, scale=scale)
    return dq, dk, dv


class _ReusedAttention(torch.autograd.Function):
    """out = attention(query, key, value), given: forward returns `out` as it is; backward is the kernel's."""

    @staticmethod
    def forward(ctx, query, key, value, out, lse, backend, extra, scale):
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.backend, ctx.extra, ctx.scale = backend, extra, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(ctx.backend, grad, query, key, value, out, lse, ctx.extra, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def _covered(module, query, key, attention_mask, dropout: float, cache, options: dict) -> bool:
    """Whether transformers' SDPA call for these arguments is plain causal attention (see the module docstring)."""
    return (getattr(module.config, "_attn_implementation", None) == "sdpa" and attention_mask is None
            and cache is None and dropout == 0.0 and options.get("softcap") is None
            and not options.get("output_attentions", False)
            and options.get("is_causal", getattr(module, "is_causal", True)) is True
            and query.shape[2] > 1 and key.shape[2] == query.shape[2] and query.shape[1] % key.shape[1] == 0)


def saved_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    dropout: float, scale: float, cache, options: dict) -> Optional[torch.Tensor]:
    """The attention output (B, T, nh, hd) through the saved path, or None where it does not apply (the caller then
    calls transformers' attention function as before).

    query (B, nh, T, hd), key and value (B, nkv, T, hd) after RoPE; options: the keyword arguments the attention
    function would get besides the mask, dropout and scaling (softcap, is_causal...)."""
    memo, recomputing = checkpoint_memo()
    if memo is None or not ENABLED or not _covered(module, query, key, attention_mask, dropout, cache, options):
        return None
    backend = _backend(query, key, value)
    if backend is None:
        return None
    index = call_index(memo, "attention")
    if not recomputing:
        if torch.is_grad_enabled():  # not the checkpoint's first pass (that runs without grad)
            return None
        out, lse, extra = _attention_with_lse(backend, query, key, value, scale)
        kept = out.transpose(1, 2).contiguous()  # (B, T, nh, hd); no copy where the kernel wrote that layout
        saved = memo.setdefault(SAVED_FOR_RECOMPUTATION, [])
        memo[("attention", index)] = (len(saved), backend, extra)
        saved += [kept, lse]
        return kept
    found = memo.get(("attention", index))
    saved = memo.get(SAVED_FOR_RECOMPUTATION, [])
    expected = (query.shape[0], query.shape[2], query.shape[1], value.shape[3])
    if found is not None and found[1] == backend and len(saved) >= found[0] + 2 \
            and tuple(saved[found[0]].shape) == expected:
        kept, lse, extra = saved[found[0]], saved[found[0] + 1], found[2]
    else:  # nothing saved for this call: compute it now (the plain path's cost, same numbers)
        with torch.no_grad():
            out, lse, extra = _attention_with_lse(backend, query, key, value, scale)
        kept = out.transpose(1, 2)
    out = _ReusedAttention.apply(query, key, value, kept.transpose(1, 2), lse, backend, extra, scale)
    return out.transpose(1, 2)
