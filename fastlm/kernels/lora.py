"""Fused LoRA projections over a frozen base weight (q/k/v together, o alone), each ONE autograd node.

One LoRA projection (PEFT's `lora.Linear` with one active adapter, no dropout, no DoRA):
    y = x W^T (+ b) + s * (x A^T) B^T        x (M, K), W (N, K) frozen, A (r, K), B (N, r), s = alpha / r
Backward computes only what is asked for (ctx.needs_input_grad):
    dB = s * dy^T (x A^T)                    (N, r)   from the saved x A^T (M, r)
    dA = s * (dy B)^T x                      (r, K)   from the saved x
    dx = dy W + s * (dy B) A                 (M, K)   W materialized again, never saved
The projections of one input (q, k, v; gate, up) stack their A matrices so that x A^T, dA and the LoRA part of
dx are one GEMM each for the whole group; B is kept pre-scaled (s B) in the compute dtype (see
`_forward_group`, `reuse_casts`). The MLP's gate and up are written side by side into one (M, 2I) tensor, so
their LoRA terms, (dy B) and dB are one GEMM each too, through the block-diagonal [s_g B_g, 0; 0, s_u B_u]
(`_forward_group`, `_backward_group`); q, k and v stay separate tensors, their gradients are put side by side
for the backward.
The frozen W is a `FrozenWeight`: 16-bit (`DenseWeight`), NF4/FP4 (`NF4Weight`, dequantized by
fastlm.kernels.nf4 into a reused workspace) or LLM.int8 (`Int8Weight`, W = CB * SCB / 127). A 4-bit or
8-bit W is materialized twice per step (forward, backward) into one workspace per (dtype, device),
sized for the largest weight: a projection holds one dequantized weight at a time (the MLP by blocks of rows
holds its three, in workspace slots; there gate | up's weights are written beside their s B, so that one GEMM of
[x | x A^T] makes their outputs with the LoRA terms: `_folded_weight`). In 16-bit compute the input gradients of
q/k/v and of the MLP's down projection are likewise one GEMM each, of [dy | dy s B] and [W; A] (`_stacked_weight`).

The gated MLP with its LoRAs, one node too, is in fastlm.kernels.lora_mlp; it uses this module's group helpers
(`_lora_terms`, `_project`, `_backward_group`, ...), workspaces and memo.

Precision: all matmuls run in the compute dtype (x's dtype, or the autocast dtype inside autocast), the
fp32 LoRA matrices cast to it (B as s * B, one rounding); gradients of A/B come in fp32 on CUDA
(`lora_grad_product`) or the compute dtype elsewhere, and are cast to A's/B's dtype where that differs. In
fp32 this equals PEFT to rounding; in bf16 it rounds at other places than PEFT does (the LoRA term added to the
base product inside one GEMM's fp32 accumulation, with beta = 1, or, folded, both summed before one rounding; the
activation rounded once) and is as accurate: tests/test_fused_lora.py (bf16 autocast) and tests/test_patching.py
(bf16 weights, on the GPU) compare both with the fp32 result.

Public: DenseWeight, NF4Weight, Int8Weight, LoRA, lora_projections, reuse_casts, reference_projection, workspace,
live_workspaces; for the checkpoint's memo: checkpoint_memo, call_index, take_saved, restore_saved.
"""
import contextlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastlm.kernels._utils import gemm_writes_fp32
from fastlm.kernels.nf4 import dequantize_nf4, reference_torch

_workspaces = {}  # (dtype, device, slot) -> flat tensor: the dequantized frozen weight of the moment


def workspace(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, shared by every quantized weight of this dtype/device.

    Shared by all shapes (not one per shape): one projection never needs two dequantized weights at once, so
    the largest weight's size is all the memory this takes (Llama-3.1-8B: 14336 x 4096 bf16 = 112 MiB). The MLP
    by blocks of rows (its first pass and backward under checkpointing) holds its gate, up and down weights at once:
    slots 1 and 2 (as large again each)."""
    key = (dtype, torch.device(device), slot)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)
        buf = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def live_workspaces() -> list:
    """The workspaces in use now (a CUDA graph that writes into them keeps references: see workspace())."""
    return list(_workspaces.values())


class DenseWeight:
    """A frozen 16/32-bit weight (N, K) and optional bias (N,), e.g. an nn.Linear's."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.weight, self.bias = weight, bias
        self.shape = tuple(weight.shape)

    def materialize(self, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        """The weight (N, K) in `dtype` (slot: see workspace(); a 16-bit weight needs none)."""
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def materialize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The weight copied into `out`, an (N, K) view whose rows may be further apart, in out's dtype."""
        return _copy_into(out, self.weight)


# Bytes per element of the widest word the row-strided copy below moves at a time.
_COPY_WORDS = ((8, torch.int64), (4, torch.int32))


def _copy_into(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out.copy_(src) for an (N, K) `out` whose rows may be further apart than K (columns of a wider matrix), src
    (N, K) contiguous of the same dtype, moved as 8-byte (or 4-byte) words where sizes, strides and alignment allow.
    torch copies a destination that is not contiguous element by element with index arithmetic per element: for bf16
    at Llama-3.2-1B's gate and up weights (8192 x 2048 each, into a 2080-wide workspace) 44 us per weight on the H200,
    about 1.5 TB/s; as int64 words 23 us (2.9 TB/s; a contiguous copy of the same bytes: 21 us), at Llama-3.1-8B's
    138 -> 67 us (bench/strided_copy.py, bench/RESULTS.md run 76)."""
    if out.dtype != src.dtype or not src.is_contiguous() or out.dim() != 2 or out.stride(1) != 1:
        return out.copy_(src)
    size = out.element_size()
    for word, word_dtype in _COPY_WORDS:
        if word > size and (out.shape[1] * size) % word == 0 and (out.stride(0) * size) % word == 0 \
                and (out.storage_offset() * size) % word == 0 and out.data_ptr() % word == 0 \
                and src.data_ptr() % word == 0:
            out.view(word_dtype).copy_(src.view(word_dtype))
            return out
    return out.copy_(src)


class NF4Weight:
    """A bitsandbytes 4-bit weight: packed bytes + QuantState (public attributes only), optional bias.

    Dequantized bit-exactly as bitsandbytes does (to quant_state.dtype, then cast to the compute dtype
    when that differs, as bnb.matmul_4bit does), into the shared workspace: by the Triton kernel on a GPU,
    by its plain-PyTorch twin on the CPU (the kernel's own tests cover it under the interpreter)."""

    def __init__(self, packed: torch.Tensor, quant_state, bias: Optional[torch.Tensor] = None):
        self.packed, self.quant_state, self.bias = packed, quant_state, bias
        self.shape = tuple(quant_state.shape)

    def materialize(self, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        n, k = self.shape
        out = workspace(n * k, self.quant_state.dtype, self.packed.device, slot).view(n, k)
        if self.packed.is_cuda:
            w = dequantize_nf4(self.packed, self.quant_state, out=out)
        else:  # the interpreter would take minutes per step on a real model; bnb's C++ CPU kernel is the definition
            w = _dequantize_on_cpu(self.packed, self.quant_state, out)
        return w if w.dtype == dtype else w.to(dtype)

    def materialize_into(self, out: torch.Tensor) -> torch.Tensor:
        """W written into `out`, an (N, K) view whose rows may be further apart (columns of a wider matrix), in
        out's dtype: straight from the packed bytes when that is quant_state.dtype, else through materialize()."""
        if out.dtype != self.quant_state.dtype:
            return out.copy_(self.materialize(out.dtype))
        if self.packed.is_cuda:
            return dequantize_nf4(self.packed, self.quant_state, out=out)
        return _dequantize_on_cpu(self.packed, self.quant_state, out)


def _dequantize_on_cpu(packed, quant_state, out):
    """NF4 on the CPU: bitsandbytes' own dequantize_4bit (what its CPU matmul runs), else the plain-PyTorch twin."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        return out.copy_(reference_torch(packed, quant_state))
    return out.copy_(bnbf.dequantize_4bit(packed, quant_state))


class Int8Weight:
    """A bitsandbytes LLM.int8 weight: CB int8 (N, K) and SCB (N,) row absmax; W = CB * SCB / 127.

    The product is formed in fp32 and rounded once to the compute dtype (bitsandbytes' own backward
    rounds SCB / 127 and the product in the compute dtype: ours is the exact value, rounded once)."""

    def __init__(self, CB: torch.Tensor, SCB: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.CB, self.SCB, self.bias = CB, SCB, bias
        self.shape = tuple(CB.shape)

    def materialize(self, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        n, k = self.shape
        out = workspace(n * k, dtype, self.CB.device, slot).view(n, k)
        return self.materialize_into(out)

    def materialize_into(self, out: torch.Tensor) -> torch.Tensor:
        """W written into `out`, an (N, K) view whose rows may be further apart, in out's dtype."""
        # int8 * fp32 computes in fp32 and casts once into `out`: no fp32 (N, K) temporary.
        return torch.mul(self.CB, (self.SCB.float() / 127.0).unsqueeze(1), out=out)


@dataclass
class LoRA:
    """One adapter on one projection: A (r, K), B (N, r), scale s (PEFT's `scaling[adapter]`)."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def reference_projection(x: torch.Tensor, base, lora: Optional[LoRA]) -> torch.Tensor:
    """The definition, plain PyTorch in x's dtype: x W^T + b + s (x A^T) B^T, differentiable."""
    w = base.materialize(x.dtype).clone()
    y = torch.nn.functional.linear(x, w, None if base.bias is None else base.bias.to(x.dtype))
    if lora is not None:
        y = y + (x @ lora.A.to(x.dtype).T) @ lora.B.to(x.dtype).T * lora.scale
    return y


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype inside autocast (what F.linear would use), else x's dtype."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


# ---- compute-dtype copies of the LoRA matrices, shared by the projections of one input ----------------------
#
# The projections of one input (q, k, v; gate, up) share one product with their stacked A matrices:
#     A_all = [A_0; A_1; ...]  (R, K), R = sum of ranks        xa_all = x A_all^T  (M, R)
# and each B is stored pre-scaled, B_i' = s_i B_i, in the compute dtype, so that backward needs no scaling pass:
#     (dy_i B_i')^T  stacked -> dyb_all^T  (R, M)     dA_all = dyb_all^T x (R, K)     dx += dyb_all A_all
# One GEMM instead of one per projection for x A^T, dA and the LoRA part of dx. On the H200 the training step
# is bound by the host's ~50-70 us per launched op (bench/RESULTS.md, run 7: GPU busy 64% at Llama-3.1-8B
# QLoRA), and each small GEMM there is up to three launches (memset, split-K GEMM, reduce).
#
# The casts are made once per forward; inside `reuse_casts(memo)` (the offloaded checkpoint enters one memo
# per layer call, for its forward and its recomputation) once per layer and step. Between a layer's forward
# and its backward the LoRA weights cannot change (the optimizer steps after backward), so the memo is never
# stale; it is never kept across steps, as a version-counter cache would be (bitsandbytes' 8-bit optimizers
# update weights without bumping it).

_memo_stack = threading.local()


@contextlib.contextmanager
def reuse_casts(memo: dict, recomputing: bool = False, cast_storage: Optional[dict] = None):
    """Within this block, LoRA casts are looked up in / stored into `memo` (a dict owned by the caller).

    recomputing: the block re-runs a layer's forward only to rebuild its graph for backward (gradient
    checkpointing): the products x A^T the forward pass stored in the memo are taken again instead of recomputed,
    and an MLP whose output feeds only the residual sum may skip computing it (see lora_mlp).
    cast_storage: a dict owned by the caller in which a cast made here is written into the tensor an earlier block
    made for the same LoRA weights (told apart by their storage), instead of being kept as a new tensor. The CUDA
    graphs of one layer's input shapes (fastlm/training/layer_graphs.py) share their casts this way: each graph
    makes them afresh when it runs, into memory all of them read, so a new shape adds only its x A^T products."""
    stack = getattr(_memo_stack, "memos", None)
    if stack is None:
        stack = _memo_stack.memos = []
    memo[_OCCURRENCES] = {}  # each pass (forward, recomputation) counts its calls from zero
    stack.append((memo, recomputing, cast_storage))
    try:
        yield
    finally:
        stack.pop()


def _active_memo():
    """(memo, recomputing, cast_storage) of the innermost reuse_casts block on this thread, or (None, False, None)
    outside any."""
    stack = getattr(_memo_stack, "memos", None)
    return stack[-1] if stack else (None, False, None)


def _recomputing() -> bool:
    return _active_memo()[1]


# memo[SAVED_FOR_RECOMPUTATION]: tensors a layer's forward pass keeps for its recomputation, in the order made (the
# attention's output and log-sum-exp: fastlm/models/saved_attention.py). The offloaded checkpoint takes them out of
# the memo after the layer's forward (take_saved), keeps them with the layer's input (offloaded to host memory on a
# GPU) and puts them back before the recomputation (restore_saved); the CUDA graphs copy them into static buffers.
SAVED_FOR_RECOMPUTATION = "saved for the recomputation"


def checkpoint_memo():
    """(memo, recomputing) of the innermost reuse_casts block on this thread, or (None, False) outside any: the
    layer's forward pass (recomputing False) or its recomputation under the offloaded checkpoint."""
    memo, recomputing, _ = _active_memo()
    return memo, recomputing


def call_index(memo: dict, kind) -> int:
    """How many calls of `kind` (any hashable) this pass (forward or recomputation: counted from zero in each
    reuse_casts block) made before this one; pairs a recomputation's call with the forward pass's."""
    occurrences = memo.setdefault(_OCCURRENCES, {})
    index = occurrences.get(kind, 0)
    occurrences[kind] = index + 1
    return index


def take_saved(memo: dict) -> list:
    """The tensors the layer's forward pass saved for its recomputation, removed from the memo."""
    return memo.pop(SAVED_FOR_RECOMPUTATION, [])


def restore_saved(memo: dict, tensors: Sequence[torch.Tensor]) -> None:
    """Give the recomputation the tensors take_saved returned (as they were, or copied back from host memory)."""
    memo[SAVED_FOR_RECOMPUTATION] = list(tensors)


def _memoized(key, sources, make):
    """make() or the memo's copy of it; `sources` (the tensors it derives from) are kept to pin their ids. key:
    (kind, ids of the sources, anything else that determines the value)."""
    memo, _, cast_storage = _active_memo()
    if memo is None:
        return make()
    hit = memo.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], sources)):
        return hit[1]
    value = make()
    if cast_storage is not None:
        place = (key[0], tuple((s.data_ptr(), s.shape) for s in sources)) + key[2:]
        stored = cast_storage.get(place)
        if stored is None or stored.shape != value.shape or stored.device != value.device:
            cast_storage[place] = value
        elif stored.data_ptr() != value.data_ptr():  # (equal when the "cast" is the weight itself: same dtype)
            value = stored.copy_(value)
    memo[key] = (sources, value)
    return value


_OCCURRENCES = "occurrences"


def _lora_input_product(x_source, a_all, As, m: int, made=None):
    """x A_all^T (M, R): made by the forward pass and kept in the memo, taken again by the recomputation.

    The recomputation sees the same input as the forward (recomputed from the same saved layer input by the same
    kernels), so the product is the same; reusing it saves one skinny GEMM per group and recomputation (up to
    three launches under cuBLAS's split-K). Calls are told apart by how many times this group has been called in
    the pass, so a layer that called one group twice would still pair each call with its own product.
    x_source: the input (M, K), or a function returning it (called only when the product is made); made: the
    product itself, already computed (the MLP's forward by blocks of rows), to be kept."""
    def make():
        if made is not None:
            return made
        x = x_source() if callable(x_source) else x_source
        return x @ a_all.T
    memo, recomputing, _ = _active_memo()
    if memo is None:
        return make()
    group = tuple(id(a) for a in As)
    key = ("xa", group, call_index(memo, group))
    hit = memo.get(key)
    if recomputing and hit is not None and all(a is b for a, b in zip(hit[0], As)) and hit[1].shape[0] == m:
        return hit[1]
    value = make()
    if not recomputing:
        memo[key] = (tuple(As), value)
    return value


def _stacked_a(As: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[A_0; A_1; ...] (R, K) in `dtype`."""
    def make():
        return As[0].to(dtype) if len(As) == 1 else torch.cat(list(As)).to(dtype)
    return _memoized(("A", tuple(id(a) for a in As), dtype), tuple(As), make)


def _block_diagonal_b(Bs, scales, widths, ranks, dtype) -> torch.Tensor:
    """[s_0 B_0, 0; 0, s_1 B_1; ...] (sum N_i, R) in `dtype`: rows per projection, columns per LoRA (a projection
    without LoRA has zero rows and no columns). Products in B's precision, one rounding to `dtype`."""
    def make():
        if len(Bs) == 1:
            return Bs[0].to(dtype) if scales[0] == 1.0 else torch.mul(
                Bs[0], scales[0], out=torch.empty(Bs[0].shape, dtype=dtype, device=Bs[0].device))
        out = torch.zeros(sum(widths), sum(ranks), dtype=dtype, device=next(b for b in Bs if b is not None).device)
        row = col = 0
        for B, scale, n, r in zip(Bs, scales, widths, ranks):
            if B is not None:
                torch.mul(B, scale, out=out[row:row + n, col:col + r])
                col += r
            row += n
        return out
    sources = tuple(b for b in Bs if b is not None)
    return _memoized(("B", tuple(id(b) for b in sources), tuple(scales), tuple(widths), dtype), sources, make)


def _lora_terms(x_source, m: int, bases, As, Bs, scales, dtype):
    """(xa_all (M, R), A_all (R, K), B_bd (sum N_i, R)) of a group's LoRAs (see the block above), or three Nones
    when no projection of the group has one. x_source: x (M, K), or a function returning it, called only when
    x A^T is not in the memo."""
    widths = [base.shape[0] for base in bases]
    with_lora = [i for i, a in enumerate(As) if a is not None]
    if not with_lora:
        return None, None, None
    a_all = _stacked_a([As[i] for i in with_lora], dtype)
    xa_all = _lora_input_product(x_source, a_all, [As[i] for i in with_lora], m)
    b_bd = _block_diagonal_b(Bs, scales, widths, [0 if a is None else a.shape[0] for a in As], dtype)
    return xa_all, a_all, b_bd


def _project(x2, bases, As, xa_all, b_bd, dtype, side_by_side=False, weights=None):
    """y_i = x W_i^T (+ b_i) + (x A_i^T) (s_i B_i)^T for the projections of x (M, K), given _lora_terms' xa_all and
    b_bd (None without LoRA). side_by_side: write them into one (M, sum N_i) tensor (gate | up) and add their LoRA
    terms with one GEMM through the block-diagonal s B; else a list of (M, N_i) tensors (q, k, v), each LoRA term
    added from its block. weights: the bases already materialized (else materialized here, one after another)."""
    m, widths = x2.shape[0], [base.shape[0] for base in bases]
    y_all = torch.empty(m, sum(widths), dtype=dtype, device=x2.device) if side_by_side else None
    ys, row, col = [], 0, 0
    for i, (base, n) in enumerate(zip(bases, widths)):
        w = base.materialize(dtype) if weights is None else weights[i]
        out = None if y_all is None else y_all[:, row:row + n]   # row stride sum N_i: cuBLAS writes it in place
        if base.bias is None:
            y = torch.mm(x2, w.T, out=out) if out is not None else x2 @ w.T
        else:
            y = torch.addmm(base.bias.to(dtype), x2, w.T, **({} if out is None else {"out": out}))
        if As[i] is not None and not side_by_side:
            r = As[i].shape[0]
            y.addmm_(xa_all[:, col:col + r], b_bd[row:row + n, col:col + r].T)
            col += r
        ys.append(y)
        row += n
    if side_by_side and xa_all is not None:
        y_all.addmm_(xa_all, b_bd.T)
    return y_all if side_by_side else ys


def _foldable(bases, b_bd) -> bool:
    """Whether projections side by side take their LoRA terms inside the base GEMM (_folded_weight): they have LoRA
    terms and no bias, and compute in a 16-bit dtype, where rounding once instead of twice matters (in fp32 both
    orders are within fp32 rounding of the exact sum, and the two GEMMs match PEFT's order: tests/test_fused_lora.py
    holds fp32 to 1e-5 of PEFT). A 4-bit or 8-bit weight is written into a workspace anyway; a 16-bit one is copied
    there (_copy_into: at Llama-3.2-1B's gate | up 2 x 23 us per pass of the ~0.15 ms the fold saves, for a
    workspace of 2I x (H + R): 64 MiB there, 224 MiB at Llama-3.1-8B)."""
    return b_bd is not None and b_bd.dtype in (torch.bfloat16, torch.float16) and all(b.bias is None for b in bases)


def _folded_weight(bases, b_bd, dtype, slot: int) -> torch.Tensor:
    """[W_all | b_bd] (sum N_i, K + R) in `dtype`, in workspace `slot`: W_all = [W_0; W_1; ...] the projections'
    weights stacked by rows, b_bd their block-diagonal s B (_block_diagonal_b) as R more columns. [x | x A^T] times
    its transpose is then every projection's output with its LoRA term, as ONE GEMM accumulated in fp32 and rounded
    once, where _project rounds x W^T and then adds (x A^T)(s B)^T with a second, rank-R GEMM that reads and writes
    all of y: at Llama-3.2-1B's gate | up (8192 x 16384 outputs) 1.020 ms for the two against 0.874 for the folded
    one and 0.024 for building [x | x A^T] (bench/RESULTS.md run 67). Rounding once also keeps a LoRA term smaller
    than half a bf16 ulp of x W^T (B early in training), which rounding x W^T first drops: the 8B loss after 12 steps
    is 0.91% from the fp32 run's folded, 1.92% unfolded (run 71)."""
    n, k, r = sum(b.shape[0] for b in bases), bases[0].shape[1], b_bd.shape[1]
    folded = workspace(n * (k + r), dtype, b_bd.device, slot).view(n, k + r)
    row = 0
    for base in bases:
        base.materialize_into(folded[row:row + base.shape[0], :k])
        row += base.shape[0]
    folded[:, k:].copy_(b_bd)
    return folded


def _stacked_weight(bases, a_all, dtype, slot: int) -> torch.Tensor:
    """[W_all; A_all] (sum N_i + R, K) in `dtype`, in workspace `slot`: the projections' weights stacked by rows
    (4-bit and 8-bit ones written straight there, 16-bit ones copied) and their stacked A (R, K) below. With it the
    input gradient dx = d W_all + (d s B) A_all is ONE GEMM of [d | d b_bd] (_backward_group's `input_grad`), the LoRA
    term inside the GEMM's fp32 sum and rounded once, instead of a second, rank-R GEMM that reads and writes all of
    dx: for the MLP's down projection at Llama-3.2-1B (dx: 8192 x 8192) that one took 22 us of every ~120 us row
    block on the H200 (bench/RESULTS.md run 75, a profile of the step). Only where the compute dtype is 16-bit
    (_input_grad_foldable). The workspace is the largest such weight's: down's (H + r) x I, 32 MiB at Llama-3.2-1B
    and 112 MiB at Llama-3.1-8B, which a 4-bit model's dequantization needs anyway and a 16-bit one adds."""
    n, k, r = sum(b.shape[0] for b in bases), bases[0].shape[1], a_all.shape[0]
    stacked = workspace((n + r) * k, dtype, a_all.device, slot).view(n + r, k)
    row = 0
    for base in bases:
        base.materialize_into(stacked[row:row + base.shape[0]])
        row += base.shape[0]
    stacked[n:].copy_(a_all)
    return stacked


def _input_grad_foldable(a_all) -> bool:
    """Whether a group's input gradient takes its LoRA term inside the base GEMM (_stacked_weight): it has one and
    computes in a 16-bit dtype (in fp32 the two GEMMs keep PEFT's order, held to 1e-5 by tests/test_fused_lora.py)."""
    return a_all is not None and a_all.dtype in (torch.bfloat16, torch.float16)


def _forward_group(x2, bases, As, Bs, scales, dtype, side_by_side=False):
    """_project of x2 (M, K) with its LoRA terms: (ys, xa_all, A_all, B_bd)."""
    xa_all, a_all, b_bd = _lora_terms(x2, x2.shape[0], bases, As, Bs, scales, dtype)
    return _project(x2, bases, As, xa_all, b_bd, dtype, side_by_side), xa_all, a_all, b_bd


def lora_grad_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (P, M) @ b (M, Q), a sum over M rows that makes a LoRA gradient (dA, dB or a block's share of one). On CUDA
    with 16-bit operands the result is fp32: cuBLAS writes its fp32 accumulators unrounded, and the fp32 A and B
    (PEFT's default) then take their gradients without a cast kernel. Elsewhere the operands' dtype (PyTorch's CPU
    matmul has no fp32 output for 16-bit operands). Every path to one gradient (blocked or not, folded or not) makes
    it with this function, so they agree to the bit (tests/kernels/test_lora.py)."""
    if gemm_writes_fp32(a, b):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def _split_da(da_all, As, need_a) -> list:
    """dA_i (A_i's dtype, None where not needed) from the stacked dA_all (R, K)."""
    dAs, col = [None] * len(As), 0
    for i, a in enumerate(As):
        if a is not None:
            r = a.shape[0]
            if need_a[i]:
                da = da_all[col:col + r]
                dAs[i] = da if da.dtype == a.dtype else da.to(a.dtype)
            col += r
    return dAs


def _split_db(db_all, As, Bs, scales, widths, need_b) -> list:
    """dB_i = s_i times the i-th diagonal block of db_all (sum N_i, R), in B_i's dtype (None where not needed)."""
    dBs, row, col = [None] * len(As), 0, 0
    for i, a in enumerate(As):
        if a is not None:
            r = a.shape[0]
            if need_b[i]:
                db = db_all[row:row + widths[i], col:col + r]
                dBs[i] = torch.mul(db, scales[i], out=torch.empty(db.shape, dtype=Bs[i].dtype, device=db.device))
            col += r
        row += widths[i]
    return dBs


def _base_input_grad(d_all, bases, dtype, out=None, weights=None):
    """sum_i d_i W_i (M, K) for d_all = [d_0 | d_1 | ...] (M, sum N_i), written into `out` when given; weights: the
    bases already materialized."""
    row = 0
    for i, base in enumerate(bases):
        w = base.materialize(dtype) if weights is None else weights[i]
        part = d_all[:, row:row + base.shape[0]]
        if row == 0:
            out = part @ w if out is None else torch.mm(part, w, out=out)
        else:
            out.addmm_(part, w)
        row += base.shape[0]
    return out


def _backward_group(d_all, x_source, xa_all, a_all, b_bd, bases, As, Bs, scales, dtype, need_dx, need_a, need_b,
                    input_grad=None, dyb=None):
    """(dAs, dBs, dx) of `_forward_group` from d_all (M, sum N_i), the gradient of its outputs side by side.

    One GEMM each for (dy B) (M, R), dA (R, K), dB (sum N_i, R; the blocks on its diagonal are the dB_i) and the
    LoRA term of dx; one per projection for its base. input_grad: a function (d_all, dy B or None) -> dx that makes
    dx instead (the MLP's gate | up as one GEMM, lora_mlp._GateUp; down's and q/k/v's with the LoRA term folded in,
    _stacked_weight). dyb: dy B (M, R) already made (q/k/v write it beside their gradients). LoRA gradients come in
    A's/B's dtype (None where not needed); x_source() is called only when some dA is needed."""
    n = len(bases)
    dAs, dBs, dx = [None] * n, [None] * n, None
    with_lora = any(a is not None for a in As)
    if dyb is None and with_lora and (need_dx or any(need_a)):
        dyb = d_all @ b_bd                                  # (M, R): s_i dy_i B_i per column block
    if with_lora and any(need_a):
        # Inline, not kept in a local: x_source() may make x (the MLP's hidden state for down, (M, I)) just for
        # this product, and it must be freed before dx (as large) is allocated below (RESULTS run 17: +128 MiB
        # at Llama-3.2-1B's peak when it was kept).
        dAs = _split_da(lora_grad_product(dyb.T, x_source() if callable(x_source) else x_source), As,
                        need_a)                             # (R, K) stacked
    if with_lora and any(need_b):
        dBs = _split_db(lora_grad_product(d_all.T, xa_all), As, Bs, scales, [base.shape[0] for base in bases], need_b)
    if need_dx:
        dx = input_grad(d_all, dyb) if input_grad is not None else \
            _plus_lora_term(_base_input_grad(d_all, bases, dtype), dyb, a_all)
    return dAs, dBs, dx


def _plus_lora_term(dx, dyb, a_all):
    """dx += (dy s B) A_all, the LoRA part of an input gradient, added by a rank-R GEMM (dx itself when dyb is None)."""
    return dx if dyb is None else dx.addmm_(dyb, a_all)


def _per_block_dyb(dys, b_bd, As) -> list:
    """[dy_i (s_i B_i)] (M, r_i) for the projections with a LoRA: the column blocks of [dy_0 | dy_1 | ...] b_bd,
    one small GEMM each over that projection's diagonal block of the block-diagonal b_bd."""
    out, row, col = [], 0, 0
    for dy, a in zip(dys, As):
        if a is not None:
            out.append(dy @ b_bd[row:row + dy.shape[1], col:col + a.shape[0]])
            col += a.shape[0]
        row += dy.shape[1]
    return out


def _pairs(adapters, n):
    """(As, Bs) lists from the flat A0, B0, A1, B1, ... inputs."""
    return [adapters[2 * i] for i in range(n)], [adapters[2 * i + 1] for i in range(n)]


class _ProjectionsFn(torch.autograd.Function):
    """Several LoRA projections of one input (q, k, v; or one projection alone). Inputs after x:
    bases (FrozenWeight list), scales, then A0, B0, A1, B1, ... (None where a projection has no LoRA)."""

    @staticmethod
    def forward(ctx, x, bases, scales, *adapters):
        dtype = _compute_dtype(x)
        As, Bs = _pairs(adapters, len(bases))
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            ys, xa_all, a_all, b_bd = _forward_group(x2, bases, As, Bs, scales, dtype)
        ctx.bases, ctx.scales, ctx.dtype, ctx.x_shape, ctx.x_dtype = bases, scales, dtype, x.shape, x.dtype
        ctx.save_for_backward(x2, xa_all, a_all, b_bd, *adapters)   # None where there is no LoRA
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.bases)
        x2, xa_all, a_all, b_bd, *adapters = ctx.saved_tensors
        As, Bs = _pairs(adapters, n)
        need = ctx.needs_input_grad
        with torch.autocast(x2.device.type, enabled=False):
            dys2 = [dy.reshape(-1, dy.shape[-1]).to(ctx.dtype) for dy in dys]
            # Side by side (one copy of the q/k/v gradients): (dy B), dA, dB and dx's LoRA term are then one
            # GEMM each for the group instead of one per projection. In 16-bit compute the copy also takes each
            # dy_i (s_i B_i) (B is block diagonal: one small GEMM per projection) and dx is ONE GEMM of
            # [dy_q | dy_k | dy_v | dy s B] [W_q; W_k; W_v; A_all] (_stacked_weight): at Llama-3.2-1B the three base
            # GEMMs and the rank-48 one took 184 us of each layer's backward, two of them reading and writing all of
            # dx again (bench/RESULTS.md run 75).
            d_all = dys2[0] if n == 1 else torch.cat(dys2, dim=1)
            dyb = input_grad = None
            if n > 1 and need[0] and _input_grad_foldable(a_all):
                d_wide = torch.cat(dys2 + _per_block_dyb(dys2, b_bd, As), dim=1)
                d_all, dyb = d_wide[:, :d_all.shape[1]], d_wide[:, d_all.shape[1]:]

                def input_grad(d_all, dyb):  # [d_all | dyb] is d_wide already; the stack in workspace slot 0
                    return d_wide @ _stacked_weight(ctx.bases, a_all, ctx.dtype, slot=0)
            dAs, dBs, dx = _backward_group(d_all, x2, xa_all, a_all, b_bd, ctx.bases, As, Bs, ctx.scales, ctx.dtype,
                                           need[0], [need[3 + 2 * i] for i in range(n)],
                                           [need[4 + 2 * i] for i in range(n)], input_grad=input_grad, dyb=dyb)
        dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, *[g for pair in zip(dAs, dBs) for g in pair])


def _flat_adapters(loras: Sequence[Optional[LoRA]]) -> list:
    flat = []
    for lora in loras:
        flat += [None, None] if lora is None else [lora.A, lora.B]
    return flat


def lora_projections(x: torch.Tensor, bases: Sequence, loras: Sequence[Optional[LoRA]]) -> tuple:
    """y_i = x W_i^T (+ b_i) + s_i (x A_i^T) B_i^T for each projection, as one autograd node.

    Args:
        x: (..., K) activations (fp32/fp16/bf16).
        bases: FrozenWeight per projection, shape (N_i, K); never receives a gradient.
        loras: LoRA per projection, or None for a projection without an adapter.
    Returns:
        tuple of (..., N_i) tensors in the compute dtype (x's, or the autocast dtype).
    """
    if len(bases) != len(loras) or not bases:
        raise ValueError(f"lora_projections needs one LoRA (or None) per base weight, got {len(bases)} bases "
                         f"and {len(loras)} adapters")
    for base in bases:
        if base.shape[1] != x.shape[-1]:
            raise ValueError(f"x has {x.shape[-1]} features but a base weight is {base.shape} (N, K)")
    return _ProjectionsFn.apply(x, list(bases), [lo.scale if lo else 0.0 for lo in loras], *_flat_adapters(loras))
