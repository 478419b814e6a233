"""The gated MLP with LoRA on any of its projections as ONE autograd node (fused LoRA, see fastlm.kernels.lora).

The gated MLP (`lora_mlp`), Llama-style or Phi-3's fused gate_up_proj:
    gate, up = x Wg^T + .., x Wu^T + ..      (M, I) each (Phi-3: one (M, 2I) projection, split in half)
    h = act(gate, up)                        silu(gate) * up, or gelu(gate) * up (tanh form for Gemma)
    y = h Wd^T + sd * (h Ad^T) Bd^T          (M, H)
It saves x, gate, up and the rank-r products; h, which only the down LoRA's dA needs, is not saved: the
activation's backward kernel writes it over dh, whose elements it has just read (`h_out`): one more store in a
pass that runs anyway instead of a second elementwise pass over gate and up. Recomputing gate and up from x
instead would cost two of the three big matmuls (+ their dequantization) again in backward, about +40% of the
MLP's backward FLOPs, to save 2 x (M, I) activations: saving them is the better trade. The activation backward
writes dgate/dup into the saved gate/up storage (in place, `inplace_backward=True`), so the backward peaks at
3 x (M, I) (gate, up, dh) instead of 5; that makes the node single-use: backpropagating it twice raises.
Under gradient checkpointing the trade is another: the recomputation runs the MLP only to build this node
for backward, right before it, so making gate and up there or in backward costs the same FLOPs. There
(`output_feeds_residual`, in a `reuse_casts(..., recomputing=True)` block) the node saves x only, and
backward makes gate | up by blocks of rows (`_mlp_backward_by_rows`), holding 3 x (M_b, I) instead of
3 x (M, I): at Llama-3.2-1B batch 4, 96 MiB instead of 384 MiB. The first pass (autograd off) runs by blocks of
rows as well (`_mlp_forward_by_rows`). `tiled=True` (Unsloth's unsloth_tiled_mlp) makes any forward do so and
leave gate | up to backward, paying their two GEMMs again there.

Precision: as fastlm.kernels.lora's projections (compute dtype, fp32 LoRA matrices cast once, gradients cast
back).

Public: lora_mlp, reference_mlp, activation_forward, activation_backward, ACTIVATIONS, MLP_ROW_BLOCK_ELEMENTS.
"""
from typing import Optional, Sequence

import torch

from fastlm.kernels import geglu, swiglu
from fastlm.kernels._utils import gemm_writes_fp32, use_triton
from fastlm.kernels.lora import (LoRA, _backward_group, _base_input_grad, _block_diagonal_b, _compute_dtype,
                                 _flat_adapters, _foldable, _folded_weight, _input_grad_foldable, _lora_input_product,
                                 _lora_terms, _pairs, _plus_lora_term, _project, _recomputing, _split_da, _split_db,
                                 _stacked_a, _stacked_weight, lora_grad_product, reference_projection)

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def reference_mlp(x, in_bases, in_loras, down_base, down_lora, activation: str) -> torch.Tensor:
    """The definition of lora_mlp: down(act(gate(x)) * up(x)), gate/up split from one output when fused."""
    outs = [reference_projection(x, b, lo) for b, lo in zip(in_bases, in_loras)]
    gate, up = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)
    return reference_projection(_activation_reference(gate, up, activation), down_base, down_lora)


def _activation_reference(gate, up, activation):
    if activation == "silu":
        return swiglu.reference(gate, up)
    return geglu.reference(gate, up, "tanh" if activation == "gelu_tanh" else "none")


def activation_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, (M, I) -> (M, I) contiguous, with the Triton kernels where they can run."""
    if not use_triton(gate, up):
        return _activation_reference(gate, up, activation)
    if activation == "silu":
        return swiglu.swiglu_forward(gate, up)
    return geglu.geglu_forward(gate, up, "tanh" if activation == "gelu_tanh" else "none")


def activation_backward(dh, gate, up, activation: str, inplace: bool, h_out=None):
    """(dgate, dup) of h = act(gate) * up; written into gate's / up's storage when inplace. h_out (M, I), which may
    be dh itself: h written there as well, as activation_forward makes it (one pass instead of a second kernel)."""
    if not use_triton(dh, gate, up):
        with torch.enable_grad():
            g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
            h = _activation_reference(g, u, activation)
            dg, du = torch.autograd.grad(h, (g, u), dh)
        if h_out is not None:
            h_out.copy_(h)
        return (gate.copy_(dg), up.copy_(du)) if inplace else (dg, du)
    if activation == "silu":
        return swiglu.swiglu_backward(dh, gate, up, inplace, h_out=h_out)
    return geglu.geglu_backward(dh, gate, up, "tanh" if activation == "gelu_tanh" else "none", inplace, h_out=h_out)


# Rows of one block of the MLP under gradient checkpointing, in its first pass (_mlp_forward_by_rows) and in the
# backward its recomputation leaves gate | up to (_mlp_backward_by_rows): the block's rows times I elements per
# (rows, I) buffer; gate | up and dh (or h) of a block are 3 such.
# 2^24 (32 MiB in bf16: 2,048 rows at Llama-3.2-1B's I = 8192, 1,152 at Llama-3.1-8B's 14336), measured on the H200
# (bench/RESULTS.md runs 27-29, one process per value, graphs on): Llama-3.2-1B QLoRA batch 4, ms/step and the
# layer graphs' pool: one block (2^30) 128.3 ms, 0.69 GiB; 2^25 130.8, 0.57; 2^24 131.6, 0.53; 2^23 132.5, 0.53
# (below 2^24 the pool's peak is elsewhere in the layer). LoRA bf16: 127.7 vs 128.7 ms (+0.8%); Llama-3.1-8B QLoRA
# batch 2: 348.6 vs 355.2 ms (+1.9%), pool 0.74 vs 0.59 GiB. 2^24 buys 0.16 GiB at 1B (what the 1B targets of
# issue 4 need) for 1-3% of step time. (Measured with the backward blocked only; blocking the first pass too took
# the pool to 0.46 GiB in run 31.)
MLP_ROW_BLOCK_ELEMENTS = 2 ** 24


# Off: the blocked backward (_mlp_backward_by_rows) makes h for dA_down by a second pass of the forward kernel over
# gate and up, as up to run 105 (bench/train_step.py --h-recomputed measures it), instead of taking it from the
# activation's backward (h_out).
H_FROM_BACKWARD = True


def _row_blocks(m: int, inner: int) -> list:
    """Row slices of an (m, ...) tensor in blocks of about MLP_ROW_BLOCK_ELEMENTS / inner rows (a multiple of
    128, cuBLAS's tile height on Hopper, once that large)."""
    rows = max(1, MLP_ROW_BLOCK_ELEMENTS // inner)
    rows -= rows % 128 if rows >= 128 else 0
    return [slice(start, min(start + rows, m)) for start in range(0, m, rows)]


class _GateUp:
    """gate | up of the MLP's input, or of blocks of its rows. When _foldable (LoRA on gate or up, no bias), their
    weights are materialized once as _folded_weight's [W_g; W_u | s B] (workspace slot 1) and each call is ONE GEMM
    of [x | x A^T]; every path through the MLP (blocked or not, forward, backward, no_grad) makes gate | up this
    way, so they agree to the bit (tests/test_lora.py compares gradients before and after an evaluation, which run
    the MLP unblocked and blocked). Else _project's GEMMs, the weights held in workspace slots 1 and 2 for all blocks
    when `hold` (the blocked passes), or materialized one at a time per call."""

    def __init__(self, in_bases, As, b_bd, dtype, hold: bool):
        self.bases, self.As, self.b_bd, self.dtype = in_bases, As, b_bd, dtype
        self.folded = _folded_weight(in_bases, b_bd, dtype, slot=1) if _foldable(in_bases, b_bd) else None
        self.weights = [base.materialize(dtype, slot=1 + i) for i, base in enumerate(in_bases)] \
            if self.folded is None and hold else None

    def outputs(self, x_rows, xa_rows):
        """gate | up (M_b, 2I) of x_rows (M_b, K), with xa_rows = x_rows A_all^T (M_b, R) or None."""
        if self.folded is not None:
            return torch.cat((x_rows, xa_rows), dim=1) @ self.folded.T
        return _project(x_rows, self.bases, self.As, xa_rows, self.b_bd, self.dtype, side_by_side=True,
                        weights=self.weights)

    def input_grad(self, d_rows, out=None):
        """d_rows W_all (M_b, K), into `out` when given, for d_rows = dgate | dup (M_b, 2I): the base part of dx."""
        if self.folded is not None:
            weight = self.folded[:, :self.folded.shape[1] - self.b_bd.shape[1]]
            return d_rows @ weight if out is None else torch.mm(d_rows, weight, out=out)
        return _base_input_grad(d_rows, self.bases, self.dtype, out=out, weights=self.weights)


class _DownGrad:
    """dh = dy W_d + (dy s_d B_d) A_d, the gradient of the activation h (M_b, I), for rows of the MLP's output
    gradient dy (M_b, H), given dyb = dy s_d B_d (M_b, r) or None without a down LoRA. When _input_grad_foldable
    (a LoRA, 16-bit compute), W_d and A_d are stacked once as [W_d; A_d] (_stacked_weight, workspace slot 0) and each
    call is ONE GEMM of [dy | dyb]; else W_d is materialized once (slot 0) and the LoRA term added by a second GEMM.
    Every path through the MLP's backward (blocked or not) makes dh this way, so they agree to the bit."""

    def __init__(self, down_base, a_down, dtype):
        self.a_down = a_down
        self.stacked = _stacked_weight([down_base], a_down, dtype, slot=0) if _input_grad_foldable(a_down) else None
        self.weight = down_base.materialize(dtype) if self.stacked is None else None

    def __call__(self, dy_rows, dyb_rows):
        if self.stacked is not None:
            return torch.cat((dy_rows, dyb_rows), dim=1) @ self.stacked
        return _plus_lora_term(dy_rows @ self.weight, dyb_rows, self.a_down)


def _add_block_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b (first block) or acc + a @ b (later blocks), for acc (P, Q) fp32 summing one LoRA-gradient
    product per block of rows, a (P, M_b) and b (M_b, Q) in the compute dtype, each product as lora_grad_product
    makes it (so one block gives the unblocked node's bits). On CUDA with 16-bit operands ONE cuBLAS GEMM writing
    fp32 (beta 0 for the first block, so acc needs no zeroing; 1 after): no 16-bit temporary, no add kernel (at
    Llama-3.2-1B, batch 4, 8 add and 2 fill kernels per layer fewer: bench/RESULTS.md run 118). Elsewhere the
    product in the operands' dtype, then added."""
    if gemm_writes_fp32(a, b):
        if first:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc += a @ b


def _mlp_backward_by_rows(dy2, x2, xa_all, a_all, b_bd, ha, a_down, b_down, in_bases, down_base, As, Bs, scales,
                          activation, dtype, need_dx, need_a, need_b):
    """(dAs, dBs, dx) of the MLP when its forward saved x (M, H) and the rank-r products only (a recomputation for
    gradient checkpointing whose output is never read): gate | up are made here from x and the saved x A^T, one
    block of rows at a time (_row_blocks), so the backward holds gate | up and dh of one block instead of the
    whole (M, 3I): Llama-3.2-1B at batch 4, 384 MiB -> 96 MiB. Same FLOPs as making gate | up in the
    recomputation. The three weights are materialized once for all blocks (4-bit and 8-bit ones into workspace
    slots 0-2, gate and up folded with their LoRA terms by _GateUp: 3 dequantizations per layer and step
    where the recomputation and backward of the unblocked node take 5); dequantized again for each block instead,
    they cost about 1.4 ms per extra block per step at Llama-3.2-1B QLoRA (bench/RESULTS.md run 26).

    Per block: gate | up (M_b, 2I); dh = dy W_d + (dy s_d B_d) A_d; the activation's backward writes dgate | dup
    over gate | up and h over dh (for dA_down); dx, (d s B) and the dB of the in-projections from dgate | dup.
    dA_down and dB_in are sums over blocks in fp32 (_add_block_product); dA_in and dB_down are one GEMM each over
    all rows from the (M, r)-sized factors kept across blocks."""
    n_in, (m, k), inner = len(in_bases), x2.shape, down_base.shape[1]
    widths = [base.shape[0] for base in in_bases]
    in_lora, down_lora = a_all is not None, a_down is not None
    need_dh = need_dx or any(need_a[:n_in]) or any(need_b[:n_in])
    dyb_down = dy2 @ b_down if down_lora and (need_dh or need_a[n_in]) else None        # (M, r_d)
    dyb_in = torch.empty(m, a_all.shape[0], dtype=dtype, device=x2.device) \
        if in_lora and need_dh and (need_dx or any(need_a[:n_in])) else None            # (M, R)
    new_sum = torch.empty if m else torch.zeros  # _add_block_product writes the first block's product whole
    da_down = new_sum(a_down.shape, dtype=torch.float32, device=x2.device) \
        if down_lora and need_a[n_in] else None                                            # (r_d, I)
    db_in = new_sum(sum(widths), a_all.shape[0], dtype=torch.float32, device=x2.device) \
        if in_lora and need_dh and any(need_b[:n_in]) else None                          # (2I, R)
    dx = torch.empty(m, k, dtype=dtype, device=x2.device) if need_dx else None
    # Each weight materialized once for all blocks (gate | up: _GateUp; down: _DownGrad).
    gate_up = _GateUp(in_bases, As[:n_in], b_bd, dtype, hold=True)
    down_grad = _DownGrad(down_base, a_down, dtype) if need_dh else None
    h_from_backward = da_down is not None and need_dh and H_FROM_BACKWARD  # h for dA_down written over dh
    for block, rows in enumerate(_row_blocks(m, inner)):
        y_in = gate_up.outputs(x2[rows], None if xa_all is None else xa_all[rows])
        gate, up = y_in.chunk(2, dim=-1)
        if da_down is not None and not h_from_backward:
            _add_block_product(da_down, dyb_down[rows].T, activation_forward(gate, up, activation), block == 0)
        if not need_dh:
            continue
        dh = down_grad(dy2[rows], None if dyb_down is None else dyb_down[rows])
        # y_in now holds dgate | dup, and dh (read first) h, where dA_down needs it
        activation_backward(dh, gate, up, activation, inplace=True, h_out=dh if h_from_backward else None)
        if h_from_backward:
            _add_block_product(da_down, dyb_down[rows].T, dh, block == 0)
        del dh
        if db_in is not None:
            _add_block_product(db_in, y_in.T, xa_all[rows], block == 0)
        if dyb_in is not None:
            torch.mm(y_in, b_bd, out=dyb_in[rows])
        if need_dx:
            _plus_lora_term(gate_up.input_grad(y_in, out=dx[rows]), None if dyb_in is None else dyb_in[rows], a_all)
    dAs, dBs = [None] * (n_in + 1), [None] * (n_in + 1)
    if dyb_in is not None and any(need_a[:n_in]):
        dAs[:n_in] = _split_da(lora_grad_product(dyb_in.T, x2), As[:n_in], need_a[:n_in])
    if db_in is not None:
        dBs[:n_in] = _split_db(db_in, As[:n_in], Bs[:n_in], scales[:n_in], widths, need_b[:n_in])
    if da_down is not None:
        dAs[n_in] = da_down.to(As[n_in].dtype)
    if down_lora and need_b[n_in]:
        dBs[n_in] = _split_db(lora_grad_product(dy2.T, ha), As[n_in:], Bs[n_in:], scales[n_in:],
                              [down_base.shape[0]], [True])[0]
    return dAs, dBs, dx


class _MLPFn(torch.autograd.Function):
    """down(act(gate, up)); inputs after x: in_bases (1 fused or 2), down_base, scales, activation, inplace,
    skip_output, tiled (see lora_mlp), then A/B pairs for each in-projection and for down (None where there is no
    LoRA)."""

    @staticmethod
    def forward(ctx, x, in_bases, down_base, scales, activation, inplace, skip_output, tiled, *adapters):
        dtype = _compute_dtype(x)
        n_in = len(in_bases)
        As, Bs = _pairs(adapters, n_in + 1)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            m = x2.shape[0]
            xa_all, a_all, b_bd = _lora_terms(x2, m, in_bases, As[:n_in], Bs[:n_in], scales[:n_in], dtype)
            made = {}

            def hidden():  # h = act(gate, up) (M, I), making (and keeping) gate | up (M, 2I) first
                made["y_in"] = y_in = _GateUp(in_bases, As[:n_in], b_bd, dtype, hold=False).outputs(x2, xa_all)
                return activation_forward(*y_in.chunk(2, dim=-1), activation)

            if skip_output:
                # A recomputation whose output is never read: h A_down^T is the forward's (from the memo; hidden()
                # runs only when it is not there) and gate | up are left to backward, made there a block of rows
                # at a time (_mlp_backward_by_rows).
                ha, a_down, b_down = _lora_terms(hidden, m, [down_base], As[n_in:], Bs[n_in:], scales[n_in:], dtype)
                y = torch.empty(m, down_base.shape[0], dtype=dtype, device=x2.device)
            elif tiled:  # by blocks of rows; backward makes gate | up again, by blocks too
                y, ha, a_down, b_down = _mlp_output_by_rows(x2, in_bases, As, Bs, scales, down_base, xa_all, b_bd,
                                                            activation, dtype)
            else:
                h = hidden()
                ha, a_down, b_down = _lora_terms(h, m, [down_base], As[n_in:], Bs[n_in:], scales[n_in:], dtype)
                (y,) = _project(h, [down_base], As[n_in:], ha, b_down, dtype)
                del h
            y_in = made.get("y_in")  # None: backward makes gate | up by blocks of rows
        ctx.in_bases, ctx.down_base, ctx.scales, ctx.activation = in_bases, down_base, scales, activation
        ctx.dtype, ctx.x_shape, ctx.x_dtype, ctx.inplace, ctx.used = dtype, x.shape, x.dtype, inplace, False
        ctx.save_for_backward(x2, y_in, xa_all, a_all, b_bd, ha, a_down, b_down, *adapters)  # y_in may be None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, y_in, xa_all, a_all, b_bd, ha, a_down, b_down, *rest = ctx.saved_tensors
        if ctx.inplace and ctx.used and y_in is not None:
            raise RuntimeError("fastlm's fused LoRA MLP overwrote its saved activations during the first backward "
                               "(in-place, to save memory); it cannot be backpropagated twice (retain_graph=True).")
        ctx.used = True
        n_in = len(ctx.in_bases)
        As, Bs = _pairs(rest, n_in + 1)
        need, dtype, scales = ctx.needs_input_grad, ctx.dtype, ctx.scales
        need_a = [need[8 + 2 * i] for i in range(n_in + 1)]
        need_b = [need[9 + 2 * i] for i in range(n_in + 1)]
        need_dh = need[0] or any(need_a[:n_in]) or any(need_b[:n_in])
        with torch.autocast(x2.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            if y_in is None:
                dAs, dBs, dx = _mlp_backward_by_rows(dy2, x2, xa_all, a_all, b_bd, ha, a_down, b_down, ctx.in_bases,
                                                     ctx.down_base, As, Bs, scales, ctx.activation, dtype, need[0],
                                                     need_a, need_b)
                grads = [g for pair in zip(dAs, dBs) for g in pair]
                dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
                return (dx, None, None, None, None, None, None, None, *grads)
            gate, up = y_in.chunk(2, dim=-1)
            # h is needed only for dA of down. With dh made (need_dh), the activation's backward writes h over dh
            # (as the blocked backward does); else h is recomputed from gate and up by the forward kernel.
            fuse_h = need_dh and need_a[n_in]
            dyb_down = dy2 @ b_down if fuse_h else None
            (dA_down,), (dB_down,), dh = _backward_group(
                dy2, lambda: activation_forward(gate, up, ctx.activation), ha, a_down, b_down, [ctx.down_base],
                As[n_in:], Bs[n_in:], scales[n_in:], dtype, need_dh, [need_a[n_in] and not fuse_h], need_b[n_in:],
                input_grad=lambda dy, dyb: _DownGrad(ctx.down_base, a_down, dtype)(dy, dyb), dyb=dyb_down)  # as blocked
            dAs, dBs, dx = [None] * n_in, [None] * n_in, None
            if need_dh:
                dgate, dup = activation_backward(dh, gate, up, ctx.activation, ctx.inplace,
                                                 h_out=dh if fuse_h else None)
                if fuse_h:
                    (dA_down,) = _split_da(lora_grad_product(dyb_down.T, dh), As[n_in:], [True])
                del dh
                d_all = y_in if ctx.inplace else torch.cat([dgate, dup], dim=-1)  # (M, 2I), gate | up
                gate_up = _GateUp(ctx.in_bases, As[:n_in], b_bd, dtype, hold=False) if need[0] else None
                dAs, dBs, dx = _backward_group(
                    d_all, x2, xa_all, a_all, b_bd, ctx.in_bases, As[:n_in], Bs[:n_in], scales[:n_in], dtype, need[0],
                    need_a[:n_in], need_b[:n_in],
                    input_grad=lambda d, dyb: _plus_lora_term(gate_up.input_grad(d), dyb, a_all))
        grads = [g for pair in zip(dAs + [dA_down], dBs + [dB_down]) for g in pair]
        dx = None if dx is None else dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, None, None, None, None, None, *grads)


def _mlp_output_by_rows(x2, in_bases, As, Bs, scales, down_base, xa_all, b_bd, activation, dtype):
    """The MLP's output (M, H) computed a block of rows at a time (_row_blocks): gate | up and h of one block,
    3 x (M_b, I), instead of the whole (M, 3I) (at Llama-3.2-1B batch 4, 96 MiB instead of 384 MiB). The weights
    are materialized once (gate | up as _GateUp holds them). x2 (M, K) in the compute dtype `dtype`;
    xa_all, b_bd: _lora_terms of the in-projections. Returns (y, ha, A_down, B_down): h A_down^T (M, r) and the
    down LoRA's casts (None without one); ha also goes into the memo, as the unblocked forward leaves it for the
    recomputation."""
    n_in, m, (hidden, inner) = len(in_bases), x2.shape[0], down_base.shape
    gate_up = _GateUp(in_bases, As[:n_in], b_bd, dtype, hold=True)
    down_weight = down_base.materialize(dtype)
    a_down = b_down = ha = None
    if As[n_in] is not None:
        a_down = _stacked_a([As[n_in]], dtype)                                                    # (r, I)
        b_down = _block_diagonal_b([Bs[n_in]], [scales[n_in]], [hidden], [a_down.shape[0]], dtype)
        ha = torch.empty(m, a_down.shape[0], dtype=dtype, device=x2.device)                      # (M, r)
    y = torch.empty(m, hidden, dtype=dtype, device=x2.device)
    for rows in _row_blocks(m, inner):
        y_in = gate_up.outputs(x2[rows], None if xa_all is None else xa_all[rows])
        h = activation_forward(*y_in.chunk(2, dim=-1), activation)
        del y_in
        if down_base.bias is None:
            torch.mm(h, down_weight.T, out=y[rows])
        else:
            torch.addmm(down_base.bias.to(dtype), h, down_weight.T, out=y[rows])
        if ha is not None:
            torch.mm(h, a_down.T, out=ha[rows])
            y[rows].addmm_(ha[rows], b_down.T)
    if ha is not None:
        _lora_input_product(None, a_down, [As[n_in]], m, made=ha)  # kept for the recomputation
    return y, ha, a_down, b_down


def _mlp_forward_by_rows(x, in_bases, down_base, scales, activation, adapters):
    """lora_mlp's output where nothing is differentiated (autograd off: the first pass of gradient checkpointing),
    by blocks of rows (_mlp_output_by_rows): in the layer graphs' pool the unblocked first pass was the largest
    working set (bench/RESULTS.md run 31). Arguments as _MLPFn.forward takes them."""
    dtype, n_in = _compute_dtype(x), len(in_bases)
    As, Bs = _pairs(adapters, n_in + 1)
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        xa_all, _, b_bd = _lora_terms(x2, x2.shape[0], in_bases, As[:n_in], Bs[:n_in], scales[:n_in], dtype)
        y = _mlp_output_by_rows(x2, in_bases, As, Bs, scales, down_base, xa_all, b_bd, activation, dtype)[0]
    return y.view(*x.shape[:-1], y.shape[-1])


def lora_mlp(x: torch.Tensor, in_bases: Sequence, in_loras: Sequence[Optional[LoRA]], down_base,
             down_lora: Optional[LoRA], activation: str, inplace_backward: bool = True,
             output_feeds_residual: bool = False, tiled: bool = False) -> torch.Tensor:
    """The gated MLP with LoRA on any of its projections, as one autograd node (see the module docstring).

    Args:
        x: (..., H) activations.
        in_bases: [gate (I, H), up (I, H)] or [gate_up (2I, H)] (gate first half, as Phi-3 splits it).
        in_loras: LoRA or None per in-projection. down_base: (H, I). down_lora: LoRA or None.
        activation: "silu" (SwiGLU), "gelu_tanh" (GeGLU, tanh form: Gemma) or "gelu" (exact erf).
        inplace_backward: write dgate/dup over the saved gate/up (saves 2 x (M, I); single backward only).
        output_feeds_residual: the caller only adds the output to the residual stream (no norm after it), so
            during a gradient-checkpointing recomputation (`reuse_casts(..., recomputing=True)`) the output's
            value is never read: its down-projection (dequantization, GEMM, LoRA term) is skipped there and
            the result left unset, while everything backward needs is still saved. Off by default.
        tiled: compute the output by blocks of rows and save x only (not gate | up): backward makes gate | up
            again by blocks (_mlp_backward_by_rows), 2 of the MLP's 3 big GEMMs again for at most 3 x (M_b, I)
            of activations instead of 3 x (M, I) (Unsloth's `unsloth_tiled_mlp`). Where the output feeds the
            residual sum, fastlm's offloaded checkpointing already runs the MLP this way at no extra cost.
    Returns:
        (..., H) in the compute dtype (unset values in a recomputation with output_feeds_residual). With autograd
        off (gradient checkpointing's first pass) no node is made and the output is computed by blocks of rows
        (_mlp_forward_by_rows).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if len(in_bases) not in (1, 2) or len(in_loras) != len(in_bases):
        raise ValueError("in_bases must be [gate, up] or [gate_up], with one LoRA (or None) each")
    width = sum(b.shape[0] for b in in_bases)
    if width % 2 or down_base.shape[1] != width // 2 or any(b.shape[1] != x.shape[-1] for b in in_bases) or \
            len({b.shape[0] for b in in_bases}) != 1:
        raise ValueError(f"MLP shapes do not fit: x (..., {x.shape[-1]}), in {[b.shape for b in in_bases]}, "
                         f"down {down_base.shape}")
    loras = list(in_loras) + [down_lora]
    scales, adapters = [lo.scale if lo else 0.0 for lo in loras], _flat_adapters(loras)
    if not torch.is_grad_enabled():
        return _mlp_forward_by_rows(x, list(in_bases), down_base, scales, activation, adapters)
    skip_output = output_feeds_residual and _recomputing()
    return _MLPFn.apply(x, list(in_bases), down_base, scales, activation, inplace_backward, skip_output, tiled,
                        *adapters)
