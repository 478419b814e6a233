"""The lm_head and its cross-entropy with the weight in host memory, streamed to the GPU by vocabulary blocks.

With offload_lm_head=True (fastlm.loading.host_weights) the output layer's weight W (V, H) lives in pinned host
memory. Its matmuls cannot read it in place (cuBLAS re-reads the weight for every tile of rows: 332 ms for 4096
rows at 128256 x 4096, bench/RESULTS.md run 58), so it is copied to the GPU block by block, BLOCK_BYTES at a time,
into one of two device buffers on a side stream while the compute stream works on the other, and each block is
used once. One pass over W per call, in both functions here:

streamed_linear(x, host_weight): x (..., H) @ W.T -> (..., V) logits, W's dtype (a differentiable matmul w.r.t. x;
    its backward streams W again).

streamed_loss_and_grads: fastlm.kernels.cross_entropy's loss (its `reference` is the definition; no bias, softcap
    or logit scale) and d loss / d h in the same single pass, with an online softmax over the blocks. Per row i,
    starting from m = -inf, s = 0, acc = 0, for each block b of the vocabulary:
        z   = h @ W_b.T                      (rows, Vb) in the model dtype (cuBLAS, fp32 accumulate), the logits
                                             the full-logits reference computes
        m'  = max(m, max_j z_j);  c = exp(m - m')
        e_j = exp(z_j - m') for j != label_i, 0 at the label; written over z in the model dtype
        s   = s * c + sum_j e_j;   the label's logit z_label is kept when the label is in the block
        acc = acc * c + e @ W_b              (rows, H) fp32 (bf16 x bf16 -> fp32 on CUDA)
    and at the end, with S = s + exp(z_label - m) (the softmax's denominator):
        loss_i      = m + log(S) - z_label
        dloss_i/dh  = sum_j p_j W_j - W_label = acc / S - (s / S) W_label
    The label's term stays out of the matmul and enters in fp32 as -(1 - p_label) W_label with 1 - p_label = s / S
    from the other entries' sum: accurate to fp32's relative precision even where p_label -> 1, where a difference
    p_label - 1 (the chunked kernel's, in fp32) keeps only fp32's absolute precision.

Shapes and dtypes: h (n, H) fp32 / fp16 / bf16 on the GPU (or the CPU, where blocks are views and nothing is
copied); host_weight (V, H) the same dtype, pinned host memory (CUDA) or any CPU tensor; labels (n,) int64.
"""
import torch
import triton
import triton.language as tl

from fastlm.kernels._utils import gemm_writes_fp32, next_power_of_2, num_warps_for

# Bytes of one weight block copied to the GPU, and the cap of one block's logits (rows x block): 32 MiB. Measured on
# the H200: pinned host -> device copies alone reach 51.6 GB/s at 8 MiB, 53.8 at 32 MiB, 54.9 at 128 MiB (run 58,
# bench/host_linear.py); the loss + backward (bench/streamed_loss.py, run 62), 128256 x 4096 with 4096 rows: 25.2 ms
# at 8 MiB, 20.1 at 16, 20.2 at 32, 20.3 at 64 (52 GB/s: bound by the copies; 14.1 ms with the weight on the GPU),
# 128256 x 2048 with 8192 rows (bound by the GEMMs): 40.8 / 18.0 / 16.5 / 15.7 ms (15.3 on the GPU); extra device
# memory 240 / 256 / 288 / 352 MiB (157 on the GPU). Run 64 repeated 32 and 64 MiB within 0.5 ms while 8 and 16
# MiB came out slower (39.1 / 20.6 ms at 8B width, 48.1 / 27.6 at 1B width). 32 MiB: the copies' full rate at both
# widths, repeatably.
BLOCK_BYTES = 32 * 2**20
# Vocabulary elements one program handles per loop step of the block update (as cross_entropy.MAX_BLOCK_V).
MAX_BLOCK_V = 8192
# Hidden elements per step when the label's weight row is copied out of a block.
MAX_BLOCK_H = 1024

_COPY_STREAMS = {}  # device index -> the side stream of the block copies


def weight_blocks(host_weight: torch.Tensor, device: torch.device, block_rows: int):
    """Yield (start, block) for consecutive blocks of `block_rows` rows of host_weight (V, H): block
    (rows, H) on `device`, ready for the current stream's next kernels and valid until the next item is asked for.

    On CUDA, two device buffers alternate; the copy of block i + 1 (side stream) is queued before block i is handed
    out, and waits for the compute stream to have finished with the block that buffer held before."""
    vocab = host_weight.shape[0]
    if device.type != "cuda":
        for start in range(0, vocab, block_rows):
            yield start, host_weight[start:start + block_rows].to(device)
        return
    compute = torch.cuda.current_stream(device)
    copier = _COPY_STREAMS.get(device.index)
    if copier is None:
        copier = _COPY_STREAMS[device.index] = torch.cuda.Stream(device)
    rows = min(block_rows, vocab)
    buffers = [torch.empty(rows, host_weight.shape[1], dtype=host_weight.dtype, device=device) for _ in range(2)]
    ready, free = [torch.cuda.Event(), torch.cuda.Event()], [torch.cuda.Event(), torch.cuda.Event()]
    starts = range(0, vocab, block_rows)

    def queue(i):
        start, slot = starts[i], i % 2
        n = min(block_rows, vocab - start)
        with torch.cuda.stream(copier):
            if i >= 2:
                copier.wait_event(free[slot])  # recorded after block i - 2's last use
            buffers[slot][:n].copy_(host_weight[start:start + n], non_blocking=True)
            ready[slot].record(copier)

    queue(0)
    try:
        for i, start in enumerate(starts):
            if i + 1 < len(starts):
                queue(i + 1)
            compute.wait_event(ready[i % 2])
            yield start, buffers[i % 2][:min(block_rows, vocab - start)]
            free[i % 2].record(compute)
    finally:  # left early (an error): no copy may still write into a buffer the allocator hands out again
        compute.wait_stream(copier)


def block_rows_for(host_weight: torch.Tensor, block_bytes: int = None) -> int:
    """Rows of host_weight per copied block: block_bytes (default BLOCK_BYTES, read at the call) worth."""
    row_bytes = host_weight.shape[1] * host_weight.element_size()
    return max(1, min(host_weight.shape[0], (block_bytes or BLOCK_BYTES) // row_bytes))


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (n, H) fp32 += a (n, K) @ b (K, H), a and b in the model dtype: products exact and summed in fp32,
    one rounding into acc (cuBLAS' bf16/fp16 -> fp32 matmul on CUDA; upcast operands elsewhere, same result)."""
    if gemm_writes_fp32(a, b):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


class StreamedLinear(torch.autograd.Function):
    """x (n, H) @ W.T with W (V, H) in host memory; backward: grad_x = grad_out @ W, W streamed again."""

    @staticmethod
    def forward(ctx, x, host_weight, block_rows):
        ctx.host_weight, ctx.block_rows = host_weight, block_rows
        out = torch.empty(x.shape[0], host_weight.shape[0], device=x.device, dtype=x.dtype)
        for start, block in weight_blocks(host_weight, x.device, block_rows):
            out[:, start:start + block.shape[0]] = x @ block.t()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        host_weight = ctx.host_weight
        acc = torch.zeros(grad_out.shape[0], host_weight.shape[1], device=grad_out.device, dtype=torch.float32)
        for start, block in weight_blocks(host_weight, grad_out.device, ctx.block_rows):
            _add_product(acc, grad_out[:, start:start + block.shape[0]].contiguous(), block)
        return acc.to(grad_out.dtype), None, None


def streamed_linear(x: torch.Tensor, host_weight: torch.Tensor, block_bytes: int = None) -> torch.Tensor:
    """x (..., H) @ host_weight.T -> (..., V) on x's device, in host_weight's dtype; differentiable in x.

    x in another dtype is cast to the weight's first, as autocast does for F.linear with a 16-bit weight."""
    if x.dtype != host_weight.dtype:
        x = x.to(host_weight.dtype)
    out = StreamedLinear.apply(x.reshape(-1, x.shape[-1]), host_weight, block_rows_for(host_weight, block_bytes))
    return out.view(*x.shape[:-1], host_weight.shape[0])


@triton.jit
def _block_update_kernel(z_ptr, stride_z, labels_ptr, m_ptr, s_ptr, z_label_ptr, scale_ptr, w_ptr, stride_w,
                         w_label_ptr, v_start, VB, H,
                         WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per row of a (rows, VB) logits block covering vocabulary [v_start, v_start + VB): the online
    softmax step of the module docstring. Updates m, s (fp32, (rows,)), writes the rescale factor c to scale_ptr,
    the label's logit to z_label_ptr when the label is in the block; with WRITE_GRAD, overwrites the block with e
    (model dtype) and copies the label's weight row out of the block w (VB, H) into w_label (rows, H)."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    local = tl.load(labels_ptr + row) - v_start  # the label's column in this block, if it is in it
    has_label = (local >= 0) & (local < VB)
    cols = tl.arange(0, BLOCK_V)
    m = tl.load(m_ptr + row)
    block_max = float("-inf")
    for start in range(0, VB, BLOCK_V):
        x = tl.load(z_row + start + cols, mask=start + cols < VB, other=float("-inf")).to(tl.float32)
        block_max = tl.maximum(block_max, tl.max(x, axis=0))
    m_new = tl.maximum(m, block_max)
    if has_label:
        tl.store(z_label_ptr + row, tl.load(z_row + local).to(tl.float32))  # read before the block is overwritten
    total = 0.0
    for start in range(0, VB, BLOCK_V):
        mask = start + cols < VB
        x = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.where(start + cols == local, 0.0, tl.exp(x - m_new))  # exp(-inf) = 0 past the block's end
        total += tl.sum(e, axis=0)
        if WRITE_GRAD:
            tl.store(z_row + start + cols, e.to(z_row.dtype.element_ty), mask=mask)
    scale = tl.exp(m - m_new)  # 0 at the first block (m = -inf)
    tl.store(s_ptr + row, tl.load(s_ptr + row) * scale + total)
    tl.store(m_ptr + row, m_new)
    tl.store(scale_ptr + row, scale)
    if WRITE_GRAD:
        if has_label:
            hcols = tl.arange(0, BLOCK_H)
            for start in range(0, H, BLOCK_H):
                mask = start + hcols < H
                w = tl.load(w_ptr + local.to(tl.int64) * stride_w + start + hcols, mask=mask)
                tl.store(w_label_ptr + row.to(tl.int64) * H + start + hcols, w, mask=mask)


def streamed_loss_and_grads(h, host_weight, labels, denom, ignore_index, need_h, *, block_bytes=None,
                            chunk_rows=None):
    """h (n, H), labels (n,) (rows already selected by the caller, any left with ignore_index count for nothing),
    denom 0-dim fp32. Returns (loss 0-dim fp32, grad_h (n, H) in h's dtype or None), grad_h already / denom.

    block_bytes: bytes of W per block (default BLOCK_BYTES); chunk_rows: rows per logits block (default: as many
    as fit block_bytes of logits); both for the tests."""
    n, hidden = h.shape
    block_rows = block_rows_for(host_weight, block_bytes)
    rows = max(1, chunk_rows or (block_bytes or BLOCK_BYTES) // (block_rows * h.element_size()))
    m = torch.full((n,), float("-inf"), device=h.device, dtype=torch.float32)
    s = torch.zeros(n, device=h.device, dtype=torch.float32)
    z_label = torch.zeros(n, device=h.device, dtype=torch.float32)
    scale = torch.empty(n, device=h.device, dtype=torch.float32)
    acc = torch.zeros(n, hidden, device=h.device, dtype=torch.float32) if need_h else None
    w_label = torch.zeros(n, hidden, device=h.device, dtype=h.dtype) if need_h else None
    logits = torch.empty(min(rows, n), block_rows, device=h.device, dtype=h.dtype)
    block_v = min(MAX_BLOCK_V, next_power_of_2(block_rows))
    for v_start, block in weight_blocks(host_weight, h.device, block_rows):
        width = block.shape[0]
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = logits[:end - start, :width]
            torch.mm(h[start:end], block.t(), out=z)
            _block_update_kernel[(end - start,)](
                z, z.stride(0), labels[start:end], m[start:end], s[start:end], z_label[start:end],
                scale[start:end], block, block.stride(0), w_label[start:end] if need_h else h, v_start, width,
                hidden, WRITE_GRAD=need_h, BLOCK_V=block_v, BLOCK_H=min(MAX_BLOCK_H, next_power_of_2(hidden)),
                num_warps=num_warps_for(block_v))
            if need_h:
                acc[start:end].mul_(scale[start:end, None])
                _add_product(acc[start:end], z, block)
    labelled = labels != ignore_index
    total = s + torch.exp(z_label - m)
    row_loss = torch.where(labelled, m + torch.log(total) - z_label, 0.0)
    loss = row_loss.sum() / denom
    if not need_h:
        return loss, None
    per_row = torch.where(labelled, 1.0 / (total * denom), 0.0)  # no row reads 1 / denom when none is labelled
    grad_h = acc.mul_(per_row[:, None]).sub_(w_label.float() * (s * per_row)[:, None])
    return loss, grad_h.to(h.dtype)

