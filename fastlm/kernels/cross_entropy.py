"""Fused linear + cross-entropy: the causal-LM loss from hidden states without the full logits.

    z      = softcap(logit_scale * (h @ W.T + b))        softcap(y) = cap * tanh(y / cap)
    loss_i = logsumexp(z_i) - z_i[label_i]               for rows with label_i != ignore_index
    loss   = sum_i loss_i / denom,   denom = number of valid rows ("mean"), num_items_in_batch
                                      (when given: transformers' gradient-accumulation rule) or 1 ("sum")

Shapes and dtypes: hidden (N, H) or (B, T, H); weight (V, H); bias (V,) or None; labels (N,) or (B, T)
int64; hidden, weight and bias share one dtype (fp32 / fp16 / bf16). Returns a 0-dim fp32 loss.

How: rows whose label is ignore_index are left out first (`_labelled_rows`; their count is read back to the host,
ideally from a `LabelledCount` started before the decoder ran, see there); the n others are cut into
chunks whose logits fit a memory cap (see `_rows_per_chunk`). For each chunk, cuBLAS computes the logits
in the model dtype (fp32 accumulate); one Triton program per row then finds the log-sum-exp online in
fp32, writes the row loss, and overwrites the logits IN PLACE with d(loss)/d(logits) (already divided by
denom, as transformers' own backward does before its cast to the model dtype); two more cuBLAS calls turn
that into grad_h[chunk] = dlogits @ W and (trainable lm_head) grad_W += dlogits.T @ h[chunk]. The chunk
buffer is reused, never copied to fp32.

Forward saves for backward: the finished gradients grad_h (n, H), grad_W (V, H), grad_b (V,) (only those
that are needed); backward only multiplies them by grad_output (0-dim) in place, so backward is cheap
and may run once (retain_graph + a second backward raises).
"""
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlm.kernels._utils import next_power_of_2, num_warps_for, use_triton
from fastlm.kernels.streamed_cross_entropy import streamed_loss_and_grads

# Memory cap of one chunk's logits buffer: 128 MiB (512 rows at vocab 128256, bf16), measured on the H200
# (bench/RESULTS.md run 28, Llama-3.2-1B QLoRA batch 4, 8192 tokens, one process per value, same call): 256 MiB
# 131.2 ms/step, timed peak 1.83 GiB allocated / 2.50 reserved; 128 MiB 131.2 ms, 1.71 / 2.38; 64 MiB 133.5 ms,
# 1.65 / 2.34. Below 128 MiB the logits GEMMs and the split-K grad_h GEMMs (K = vocab) get too short to run at
# full speed; above it the buffer is memory at the step's peak for no speed.
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Rows per chunk are rounded to a multiple of this (the M tile of cuBLAS' large bf16 kernels), so no
# chunk pays for a ragged last M tile except the final one. Chosen by rule; to be measured on the H200.
ROW_ALIGN = 128
# Vocabulary elements one program handles per loop step: 8192 bf16 = 16 KiB, i.e. two 16-byte vector
# loads per thread with 16 warps (num_warps_for(8192) = 16); a 128256 vocab row takes 16 steps per
# pass. Chosen by rule (large blocks, few block reductions); checked on the H200 in the training step
# (bench/RESULTS.md run 25, Llama-3.2-1B QLoRA): 221.9 us per 1024-row chunk of bf16 logits, which the kernel
# reads twice and writes once (788 MB): 3.55 TB/s, 83% of the measured copy rate (4.3 TB/s); the kernel is
# 1.4% of that step.
MAX_BLOCK_V = 8192

# Tests set this to fill every preallocated buffer with NaN first, proving each element is written.
_POISON = False


def reference(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None, logit_scale=None,
              shift_labels=False, num_items_in_batch=None, reduction="mean"):
    """The definition, as transformers computes it: lm_head in the model dtype (then logit scaling and
    final-logit softcapping in the model dtype, like Cohere and Gemma 2), then ForCausalLMLoss
    (logits.float(), labels padded with ignore_index and shifted, F.cross_entropy sum / num_items or mean)."""
    logits = F.linear(hidden, weight, bias)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    logits = logits.float()
    if shift_labels:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, weight.shape[0])
    labels = labels.reshape(-1).to(logits.device)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _capped(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """fp32 raw logits -> (z, t): z the logits the loss sees, t = tanh(y / cap) (for the chain rule)."""
    y = x
    if HAS_SCALE:
        y = y * logit_scale
    t = y
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0  # tanh; libdevice tanh is broken in the interpreter
        y = softcap * t
    return y, t


@triton.jit
def _ce_fwd_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, grad_scale_ptr, V, ignore_index,
                   logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row of a (rows, V) logits chunk: loss_ptr[row] = lse - z[label] (fp32) and, when
    WRITE_GRAD, logits[row, :] <- grad_scale * d loss_row / d logits[row, :] in the logits dtype."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:  # the row adds nothing to either gradient matmul
            for start in range(0, V, BLOCK_V):
                tl.store(row_ptr + start + cols, tl.zeros([BLOCK_V], dtype=row_ptr.dtype.element_ty),
                         mask=start + cols < V)
    else:
        # pass 1: online log-sum-exp, one block max and one exp per element
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            z, t = _capped(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # labels outside [0, V) give a wrong loss instead of an out-of-bounds read (PyTorch raises)
        x_label = tl.load(row_ptr + label, mask=(label >= 0) & (label < V), other=0.0).to(tl.float32)
        z_label, t_label = _capped(x_label, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        tl.store(loss_ptr + row, lse - z_label)
        if WRITE_GRAD:
            # pass 2: (softmax - onehot) * grad_scale, through softcap and scale, written over the logits
            g = tl.load(grad_scale_ptr)
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                z, t = _capped(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
                d = tl.exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)
                d = d * g
                if HAS_SOFTCAP:
                    d = d * (1.0 - t * t)
                if HAS_SCALE:
                    d = d * logit_scale
                tl.store(row_ptr + start + cols, d.to(row_ptr.dtype.element_ty), mask=mask)


def _rows_per_chunk(n_rows: int, vocab: int, elem_size: int, chunk_bytes: int) -> int:
    """Rows whose logits fit `chunk_bytes`, rounded down to ROW_ALIGN, then balanced over the chunks
    needed (e.g. 1100 rows with room for 1024 -> 2 chunks of 640 and 460, not 1024 and 76)."""
    cap = max(1, chunk_bytes // (vocab * elem_size))
    if cap >= ROW_ALIGN:
        cap -= cap % ROW_ALIGN
    n_chunks = max(1, math.ceil(n_rows / cap))
    rows = math.ceil(n_rows / n_chunks)
    if rows >= ROW_ALIGN:
        rows = min(cap, math.ceil(rows / ROW_ALIGN) * ROW_ALIGN)
    return rows


def _alloc(shape, like, dtype=None):
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if _POISON else out


def _chunked_loss_and_grads(h, need_h, need_w, need_b, *, weight, bias, labels, denom, opts):
    """h (N, H), labels (N,), denom 0-dim fp32. Returns the loss (0-dim fp32) and grad_h, grad_W,
    grad_b (None where not needed), all already divided by denom."""
    n, vocab = h.shape[0], weight.shape[0]
    ignore_index, softcap, logit_scale, rows = opts
    write_grad = need_h or need_w or need_b
    row_loss = _alloc((n,), h, torch.float32)
    grad_h = _alloc(h.shape, h) if need_h else None
    grad_w = (_alloc(weight.shape, weight) if n else torch.zeros_like(weight)) if need_w else None
    grad_b = torch.zeros(vocab, device=h.device, dtype=torch.float32) if need_b else None
    grad_scale = (1.0 / denom).reshape(1)  # inf when no row is valid: then no row reads it
    buf = _alloc((min(rows, n), vocab), h)
    block = min(MAX_BLOCK_V, next_power_of_2(vocab))
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h_c, logits = h[start:end], buf[: end - start]
        if bias is None:
            torch.mm(h_c, weight.t(), out=logits)
        else:
            torch.addmm(bias, h_c, weight.t(), out=logits)
        _ce_fwd_kernel[(end - start,)](
            logits, logits.stride(0), labels[start:end], row_loss[start:end], grad_scale, vocab,
            ignore_index, 1.0 if logit_scale is None else float(logit_scale),
            1.0 if softcap is None else float(softcap),
            HAS_SCALE=logit_scale is not None, HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad,
            BLOCK_V=block, num_warps=num_warps_for(block))
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])
        if need_w:
            # Accumulated in the weight dtype: cuBLAS sums each chunk's K = rows products in fp32 and
            # rounds once per chunk (16 roundings at 16384 tokens). An fp32 buffer would cost 2 GiB at
            # 128256 x 4096, four times the whole memory budget; the rounding error stays within a few
            # ulp of the full-logits reference (the tests bound it by the chunk count).
            if start == 0:
                torch.mm(logits.t(), h_c, out=grad_w)
            else:
                grad_w.addmm_(logits.t(), h_c)
        if need_b:
            grad_b += logits.sum(0, dtype=torch.float32)
    loss = row_loss.sum() / denom
    return loss, grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """forward: the loss and every needed gradient, from `loss_and_grads(h (N, H), need_h, need_w, need_b)` (the
    chunked schedule here, or the streamed one); backward: scale them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, loss_and_grads):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        h = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # a no-op for the usual contiguous hidden
        loss, grad_h, grad_w, grad_b = loss_and_grads(h, need_h, need_w, need_b)
        ctx.grads = (None if grad_h is None else grad_h.view(hidden.shape), grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward can run once per forward "
                               "(its gradients are computed in forward and scaled in place)")
        grads, ctx.grads = ctx.grads, None
        # Always multiply (no sync to test grad_output == 1): ~0.5 ms for a 1 GiB grad_W at 4 TB/s.
        grads = tuple(None if g is None else g.mul_(grad_output) for g in grads)
        return grads + (None,)


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None,
                               logit_scale=None, shift_labels=False, num_items_in_batch=None,
                               reduction="mean", *, chunk_bytes=None, chunk_rows=None, labelled_count=None,
                               host_weight=None):
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, never holding all the logits.

    Args:
        hidden: (N, H) or (B, T, H), fp32/fp16/bf16; weight: (V, H) same dtype; bias: (V,) or None.
        labels: (N,) or (B, T) int64 in [0, V) or `ignore_index` (those rows count for nothing).
        softcap: Gemma-2 final logit softcapping `cap * tanh(z / cap)`, applied after `logit_scale`.
        logit_scale: multiply the logits by this (Cohere `logit_scale`; Granite: 1 / logits_scaling).
        shift_labels: position t predicts labels[..., t + 1] (the last position of each row predicts
            nothing), as transformers' ForCausalLMLoss does.
        num_items_in_batch: int or tensor; when given, loss = sum / num_items_in_batch (transformers'
            gradient-accumulation convention) whatever `reduction` says.
        reduction: "mean" (over valid rows; NaN when there are none, like PyTorch) or "sum".
        chunk_bytes / chunk_rows: memory cap of one chunk's logits (default DEFAULT_CHUNK_BYTES, read at the
            call), or rows per chunk (tests).
        labelled_count: a LabelledCount made from these same labels (same ignore_index and shift_labels) before
            the hidden states were computed: the number of labelled rows is then read without a host sync.
        host_weight: the weight's values in pinned host memory (offload_lm_head=True; `weight` is then its
            host-mapped alias): the loss streams it to the GPU by vocabulary blocks in one pass
            (fastlm.kernels.streamed_cross_entropy; chunk_bytes / chunk_rows then size its blocks / logits
            rows). The weight must be frozen, with no bias, softcap or logit_scale.
    Returns:
        0-dim fp32 loss, differentiable w.r.t. hidden, weight and bias.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not use_triton(hidden, weight):
        return reference(hidden, weight, labels, bias, ignore_index, softcap, logit_scale, shift_labels,
                         num_items_in_batch, reduction)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden {hidden.dtype}, weight {weight.dtype} and bias must share a dtype")
    if host_weight is not None and (bias is not None or softcap is not None or logit_scale is not None
                                    or weight.requires_grad):
        raise ValueError("the streamed loss (host_weight) has no bias, softcap or logit_scale and leaves the weight "
                         "frozen")
    if shift_labels:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    labels = labels.reshape(-1).to(hidden.device)
    if labels.numel() != hidden.numel() // hidden.shape[-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    labels = labels.contiguous()
    labelled = labels != ignore_index  # (N,) bool
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
    elif reduction == "mean":
        denom = labelled.sum().to(torch.float32)
    else:
        denom = torch.ones((), device=hidden.device, dtype=torch.float32)
    hidden, labels = _labelled_rows(hidden.reshape(-1, hidden.shape[-1]), labels, labelled, labelled_count)
    if host_weight is not None:
        loss_and_grads = functools.partial(_streamed, host_weight, labels, denom, ignore_index, chunk_bytes,
                                           chunk_rows)
    else:
        rows = max(1, chunk_rows or _rows_per_chunk(labels.numel(), weight.shape[0], weight.element_size(),
                                                     chunk_bytes or DEFAULT_CHUNK_BYTES))
        loss_and_grads = functools.partial(_chunked_loss_and_grads, weight=weight, bias=bias, labels=labels,
                                           denom=denom, opts=(ignore_index, softcap, logit_scale, rows))
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        # loss only (evaluation): the kernel skips the gradient pass and no gradient matmul runs
        return loss_and_grads(hidden.contiguous(), False, False, False)[0]
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, loss_and_grads)


def _streamed(host_weight, labels, denom, ignore_index, block_bytes, chunk_rows, h, need_h, need_w, need_b):
    loss, grad_h = streamed_loss_and_grads(h, host_weight, labels, denom, ignore_index, need_h,
                                           block_bytes=block_bytes, chunk_rows=chunk_rows)
    return loss, grad_h, None, None


def _labelled_rows(hidden, labels, labelled, labelled_count=None):
    """(hidden (n, H), labels (n,)): the rows of hidden (N, H) and labels (N,) whose label is not ignore_index
    (labelled: (N,) bool, labels != ignore_index).

    Ignored rows (prompt tokens of chat data, padding, the last position of each row once labels are shifted) add
    nothing to the loss or to any gradient, so their logits are never computed: with half the labels ignored the
    lm_head's GEMMs do half the work. The selection is differentiable (index_select: its backward puts zeros in the
    ignored rows of grad_hidden). Sizing it needs the count n on the host: from `labelled_count` when given (no
    wait), else read here (one sync). While a CUDA graph is captured (no sync allowed) every row is kept.
    """
    if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        return hidden, labels
    n = labelled_count.value() if labelled_count is not None else int(labelled.sum())
    if n == labels.numel():
        return hidden, labels
    kept = torch.nonzero_static(labelled, size=n).squeeze(1)  # sized by n: no sync of its own
    return hidden.index_select(0, kept), labels.index_select(0, kept)


class LabelledCount:
    """How many labels are not ignore_index, brought to the host without making it wait.

    The fused loss must know how many rows it keeps (`_labelled_rows`) before it launches anything, and reading a
    count computed at the loss stalls the host until the decoder's last kernel has run, then leaves the GPU idle
    while the loss is launched. Made from the labels before the decoder runs (causal_lm_forward does), the count and
    its copy into pinned host memory queue behind the labels; `value()` at the loss finds them long landed
    (bench/RESULTS.md run 41, Llama-3.2-1B QLoRA batch 4 x 2048 on the H200: 136.4 ms per step with the count read
    at the loss, 133.5 with a LabelledCount, 133.6 with no row selection at all). On the CPU the count is simply
    computed.

    Args:
        labels: (B, T) or (N,) int64, as passed to fused_linear_cross_entropy.
        ignore_index, shift_labels: as fused_linear_cross_entropy's (shifted: the first label of each row is never
            a target).
    """

    def __init__(self, labels: torch.Tensor, ignore_index: int = -100, shift_labels: bool = False):
        count = ((labels[..., 1:] if shift_labels else labels) != ignore_index).sum()
        self._landed = None
        if count.is_cuda:
            self._host = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._landed = torch.cuda.Event()
            self._landed.record(torch.cuda.current_stream(count.device))
        else:
            self._host = count

    def value(self) -> int:
        if self._landed is not None:
            self._landed.synchronize()
        return int(self._host)
