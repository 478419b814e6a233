"""Fused LoRA math (fastlm.kernels.lora, lora_mlp) vs its plain-PyTorch definition: outputs, dx, dA, dB.

Tolerance: the fused code sums the same products in another order (x W^T then += s (x A^T) B^T in one
addmm; dx accumulated over projections), so each element may differ from the reference by the rounding of
a reordered dot product. We accept |exact - ours| <= |exact - reference| + 16 ulp(dtype) * max|exact|:
a reordered K-term sum moves a result by a few ulps of the largest partial sums, which are bounded by
max|exact| times a small factor for these random inputs (K <= 200); 16 ulps leaves room for the fp32
activation kernel's single rounding too.
"""
import weakref

import pytest
import torch

from fastlm.kernels import lora as op
from fastlm.kernels import lora_mlp as mlp
from tests.kernels.check import ULP, assert_no_worse_than_reference


def _close(ours, ref, exact, dtype, name):
    atol = 16 * ULP[dtype] * float(exact.detach().abs().max())
    assert_no_worse_than_reference(ours, ref, exact, atol=atol, name=name)


def _dense(n, k, dtype, device, bias=False, gen=None):
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return op.DenseWeight(w, b)


def _nf4(n, k, device, gen, dtype=torch.bfloat16):
    """An NF4 weight (N, K) quantized by bitsandbytes from random `dtype` values of scale 1/sqrt(K), blocksize 64."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    return op.NF4Weight(*bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))


def _lora(n, k, r, device, gen, scale=2.0, grad=True):
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(device).requires_grad_(grad)
    b = (torch.randn(n, r, generator=gen) / r ** 0.5).to(device).requires_grad_(grad)
    return op.LoRA(a, b, scale)


def _grads(outs, inputs, upstream):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(outs, wanted, upstream)


def _to64(base):
    if isinstance(base, op.DenseWeight):
        return op.DenseWeight(base.weight.double(), None if base.bias is None else base.bias.double())
    return op.DenseWeight(base.materialize(torch.float32).double().clone(),
                          None if base.bias is None else base.bias.double())


def _lora64(lora):
    if lora is None:
        return None
    return op.LoRA(lora.A.detach().double().requires_grad_(), lora.B.detach().double().requires_grad_(), lora.scale)


def _params(x, loras):
    return [x] + [t for lo in loras if lo is not None for t in (lo.A, lo.B)]


def _check_projections(x, bases, loras, dtype, name):
    gen = torch.Generator().manual_seed(1)
    outs = op.lora_projections(x, bases, loras)
    ups = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    got = _grads(outs, _params(x, loras), ups)
    refs = [op.reference_projection(x, b, lo) for b, lo in zip(bases, loras)]
    ref_grads = _grads(refs, _params(x, loras), ups)
    x64 = x.detach().double().requires_grad_()
    loras64 = [_lora64(lo) for lo in loras]
    exact = [op.reference_projection(x64, _to64(b), lo) for b, lo in zip(bases, loras64)]
    exact_grads = _grads(exact, _params(x64, loras64), [u.double() for u in ups])
    for i, (o, r, e) in enumerate(zip(outs, refs, exact)):
        assert o.shape == r.shape and o.dtype == x.dtype
        _close(o, r, e, dtype, f"{name} y{i}")
    for i, (g, r, e) in enumerate(zip(got, ref_grads, exact_grads)):
        _close(g, r, e, dtype, f"{name} grad{i}")


def _check_mlp(y, got, x, in_bases, in_loras, down, down_lora, activation, upstream, dtype):
    """The fused MLP's output y (None: not checked) and its gradients `got` (of x and every LoRA matrix, as _params
    orders them, for the upstream gradient `upstream`) against PyTorch's reference in the same dtype and the fp64
    result: the tolerance of this file."""
    params = _params(x, in_loras + [down_lora])
    ref = mlp.reference_mlp(x, in_bases, in_loras, down, down_lora, activation)
    ref_grads = _grads([ref], params, [upstream])
    x64 = x.detach().double().requires_grad_()
    loras64 = [_lora64(lo) for lo in in_loras + [down_lora]]
    exact = mlp.reference_mlp(x64, [_to64(b) for b in in_bases], loras64[:-1], _to64(down), loras64[-1], activation)
    exact_grads = _grads([exact], _params(x64, loras64), [upstream.double()])
    if y is not None:
        _close(y, ref, exact, dtype, "y")
    for j, (g, r, e) in enumerate(zip(got, ref_grads, exact_grads)):
        assert g.shape == r.shape and g.dtype == r.dtype
        _close(g, r, e, dtype, f"grad{j}")


@pytest.mark.parametrize("shape", [(2, 7, 64), (5, 67), (1, 1, 3)])
def test_projections_dense_fp32(shape, device):
    gen = torch.Generator().manual_seed(0)
    k = shape[-1]
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    bases = [_dense(48, k, torch.float32, device, bias=True, gen=gen), _dense(17, k, torch.float32, device, gen=gen),
             _dense(17, k, torch.float32, device, gen=gen)]
    loras = [_lora(48, k, 4, device, gen), None, _lora(17, k, 3, device, gen, scale=0.5)]
    _check_projections(x, bases, loras, torch.float32, f"dense {shape}")


def test_projections_nf4_and_int8(device):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(0)
    k = 128
    w = torch.randn(96, k, generator=gen).to(device)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    nf4 = op.NF4Weight(packed, state)
    assert torch.equal(nf4.materialize(torch.float32), bnbf.dequantize_4bit(packed, state))
    cb, scb, _ = bnbf.int8_vectorwise_quant(w[:40].half())
    int8 = op.Int8Weight(cb, scb, torch.randn(40, generator=gen).to(device))
    exact_w = (cb.double() * (scb.double() / 127).unsqueeze(1))
    assert torch.allclose(int8.materialize(torch.float32).double(), exact_w, rtol=ULP[torch.float32], atol=0)
    x = torch.randn(3, 9, k, generator=gen).to(device).requires_grad_()
    _check_projections(x, [nf4, int8], [_lora(96, k, 8, device, gen), _lora(40, k, 8, device, gen)],
                       torch.float32, "nf4+int8")


@pytest.mark.parametrize("with_lora", [(True, True, True), (True, False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qkv_backward_folds_lora_terms_in_16_bit(with_lora, dtype, device, monkeypatch):
    """q/k/v (an NF4, a 16-bit and an LLM.int8 weight) in 16-bit: backward makes dx as ONE GEMM of [dy_q | dy_k | dy_v |
    dy s B] [W_q; W_k; W_v; A_all] (_stacked_weight, once), with outputs and gradients within this file's tolerance
    of PyTorch's reference in that dtype and the fp64 result; in fp32 it keeps the separate GEMMs (no stacking)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    stacks, stack = [], op._stacked_weight
    monkeypatch.setattr(op, "_stacked_weight", lambda *args, **kw: (stacks.append(1), stack(*args, **kw))[1])
    gen = torch.Generator().manual_seed(5)
    k = 128  # a multiple of the NF4 blocksize
    cb, scb, _ = bnbf.int8_vectorwise_quant(torch.randn(24, k, generator=gen).to(device).half())
    bases = [_nf4(64, k, device, gen, torch.bfloat16 if dtype == torch.float32 else dtype),
             _dense(24, k, dtype, device, gen=gen), op.Int8Weight(cb, scb)]
    loras = [_lora(n, k, 4, device, gen) if on else None for n, on in zip((64, 24, 24), with_lora)]
    x = torch.randn(3, 11, k, generator=gen).to(device, dtype).requires_grad_()
    _check_projections(x, bases, loras, dtype, f"qkv {dtype}")
    assert len(stacks) == (0 if dtype == torch.float32 else 1)


def test_folded_qkv_backward_is_no_less_accurate(device, monkeypatch):
    """bf16 q/k/v over NF4 weights, r=16 LoRAs with nonzero B: dx and the LoRA gradients with dx's LoRA term folded
    into the base GEMM are no further from the fp64 result (relative Frobenius error) than with the separate GEMMs,
    within 5% (the same products, rounded once fewer), and under 1%. Measured over 6 draws: dx's error 0.82x the
    separate GEMMs', the LoRA gradients' equal (their GEMMs are the same)."""
    gen = torch.Generator().manual_seed(8)
    k, widths = 256, (256, 64, 64)
    bases = [_nf4(n, k, device, gen) for n in widths]
    loras = [_lora(n, k, 16, device, gen, scale=1.0) for n in widths]
    x = torch.randn(2, 45, k, generator=gen).to(device, torch.bfloat16).requires_grad_()
    ups = [torch.randn(2, 45, n, generator=gen).to(device, torch.bfloat16) for n in widths]

    def grads():
        return _grads(op.lora_projections(x, bases, loras), _params(x, loras), ups)
    folded = grads()
    with monkeypatch.context() as patch:
        patch.setattr(op, "_input_grad_foldable", lambda a_all: False)
        unfolded = grads()
    x64, loras64 = x.detach().double().requires_grad_(), [_lora64(lo) for lo in loras]
    exact = _grads([op.reference_projection(x64, _to64(b), lo) for b, lo in zip(bases, loras64)],
                   _params(x64, loras64), [u.double() for u in ups])
    for name, f, u, e in zip(["dx", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"], folded, unfolded, exact):
        error_f, error_u = (float((t.double() - e).norm() / e.norm()) for t in (f, u))
        assert error_f <= 1.05 * error_u and error_u < 1e-2, f"{name}: folded {error_f:.3g}, unfolded {error_u:.3g}"


def test_workspace_is_shared_across_shapes(device):
    gen = torch.Generator().manual_seed(0)
    cb = torch.randint(-127, 128, (64, 32), generator=gen, dtype=torch.int8).to(device)
    a = op.Int8Weight(cb, torch.rand(64).to(device) + 1).materialize(torch.float32)
    b = op.Int8Weight(cb.T.contiguous(), torch.rand(32).to(device) + 1).materialize(torch.float32)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_only_needed_grads(device):
    """Frozen A/B get no gradient, and an input that does not require grad gets none either."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, generator=gen).to(device)
    frozen, trained = _lora(16, 32, 2, device, gen, grad=False), _lora(16, 32, 2, device, gen)
    base = _dense(16, 32, torch.float32, device, gen=gen)
    y = op.lora_projections(x, [base, base], [frozen, trained])
    sum(t.sum() for t in y).backward()
    assert frozen.A.grad is None and frozen.B.grad is None
    assert trained.A.grad is not None and trained.B.grad is not None


MLP_CASES = [("silu", 2, (True, True, True)), ("silu", 1, (True, True)), ("gelu_tanh", 2, (False, True, True)),
             ("gelu", 2, (True, False, False)), ("gelu_tanh", 1, (False, True))]


@pytest.mark.parametrize("activation,n_in,with_lora", MLP_CASES)
@pytest.mark.parametrize("inplace", [True, False])
def test_mlp_fp32(activation, n_in, with_lora, inplace, device):
    gen = torch.Generator().manual_seed(0)
    h, i = 40, 56
    x = (2 * torch.randn(3, 5, h, generator=gen)).to(device).requires_grad_()
    widths = [i, i] if n_in == 2 else [2 * i]
    in_bases = [_dense(wd, h, torch.float32, device, bias=(j == 0), gen=gen) for j, wd in enumerate(widths)]
    in_loras = [_lora(wd, h, 4, device, gen) if on else None for wd, on in zip(widths, with_lora)]
    down = _dense(h, i, torch.float32, device, gen=gen)
    down_lora = _lora(h, i, 4, device, gen) if with_lora[-1] else None
    params = _params(x, in_loras + [down_lora])
    y = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation, inplace_backward=inplace)
    up = torch.randn(y.shape, generator=gen).to(device)
    _check_mlp(y, _grads([y], params, [up]), x, in_bases, in_loras, down, down_lora, activation, up, torch.float32)


def test_mlp_backward_makes_no_second_hidden_state(device, monkeypatch):
    """The down projection's dA needs the hidden state h (M, I) in backward: the activation's backward writes it over
    dh (h_out), so backward makes no h of its own beside dh and dgate | dup. (A recomputed h that stayed alive until
    dx was made raised Llama-3.2-1B QLoRA's peak by 128 MiB: bench/RESULTS.md run 17.) Every h the forward kernel
    makes is recorded by a weak reference; the down weight checks the newest one when backward asks for it."""
    made = []
    activation_forward = mlp.activation_forward

    def recording(gate, up, activation):
        h = activation_forward(gate, up, activation)
        made.append(weakref.ref(h))
        return h

    class Down(op.DenseWeight):
        in_backward, h_alive = False, []

        def materialize(self, dtype):
            if self.in_backward:
                self.h_alive.append(made[-1]() is not None)
            return super().materialize(dtype)

    monkeypatch.setattr(mlp, "activation_forward", recording)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 24, generator=gen).to(device).requires_grad_()
    in_bases = [_dense(40, 24, torch.float32, device, gen=gen) for _ in range(2)]
    in_loras = [_lora(40, 24, 4, device, gen) for _ in range(2)]
    down = Down(_dense(24, 40, torch.float32, device, gen=gen).weight)
    y = mlp.lora_mlp(x, in_bases, in_loras, down, _lora(24, 40, 4, device, gen), "silu")
    down.in_backward = True
    y.sum().backward()
    assert len(made) == 1 and down.h_alive == [False]  # h made by the forward only, gone when backward runs


def test_mlp_without_triton_matches(device, monkeypatch):
    """The plain-PyTorch activation path (a CPU without the interpreter) gives the same numbers."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=gen).to(device).requires_grad_()
    bases = [_dense(24, 32, torch.float32, device, gen=gen) for _ in range(2)]
    loras = [_lora(24, 32, 2, device, gen) for _ in range(2)]
    down, down_lora = _dense(32, 24, torch.float32, device, gen=gen), _lora(32, 24, 2, device, gen)
    params = _params(x, loras + [down_lora])

    def run():
        y = mlp.lora_mlp(x, bases, loras, down, down_lora, "gelu_tanh")
        return [y] + list(torch.autograd.grad(y.square().sum(), params))
    with_kernels = run()
    monkeypatch.setattr(mlp, "use_triton", lambda *tensors: False)
    without = run()
    for a, b in zip(with_kernels, without):
        # fp32 kernel vs fp32 torch activation: a few fp32 ulps apart, relative to the largest value.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()))


def test_mlp_second_backward_raises(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen).to(device).requires_grad_()
    bases = [_dense(8, 16, torch.float32, device, gen=gen) for _ in range(2)]
    y = mlp.lora_mlp(x, bases, [None, None], _dense(16, 8, torch.float32, device, gen=gen), None, "silu")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        y.sum().backward()


def test_bad_shapes_raise(device):
    base = _dense(8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="features"):
        op.lora_projections(torch.randn(2, 15), [base], [None])
    with pytest.raises(ValueError, match="activation"):
        mlp.lora_mlp(torch.randn(2, 16), [base, base], [None, None], _dense(16, 8, torch.float32, device), None, "relu")
    with pytest.raises(ValueError, match="MLP shapes"):
        mlp.lora_mlp(torch.randn(2, 16), [base, base], [None, None], _dense(16, 9, torch.float32, device), None, "silu")
    with pytest.raises(ValueError, match="MLP shapes"):  # gate and up of other widths (their sum would fit)
        mlp.lora_mlp(torch.randn(2, 16), [_dense(6, 16, torch.float32, device), _dense(10, 16, torch.float32, device)],
                    [None, None], _dense(16, 8, torch.float32, device), None, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("n_in", [1, 2])
@pytest.mark.parametrize("recomputed", [False, True])
def test_mlp_bf16_gpu(n_in, recomputed, monkeypatch):
    """bf16 on the H200: within bf16 rounding of the fp64 result, as PyTorch's own bf16 reference is. recomputed:
    gradient checkpointing's passes, by blocks of 96 rows (258 rows: the last block shorter): the first under
    no_grad, then the recomputation's node, whose backward makes gate | up by blocks."""
    monkeypatch.setattr(mlp, "MLP_ROW_BLOCK_ELEMENTS", 96 * 704)
    gen = torch.Generator().manual_seed(0)
    h, i = 256, 704
    x = torch.randn(2, 129, h, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    widths = [i, i] if n_in == 2 else [2 * i]
    in_bases = [_dense(wd, h, torch.bfloat16, "cuda", gen=gen) for wd in widths]
    in_loras = [_lora(wd, h, 16, "cuda", gen) for wd in widths]
    down, down_lora = _dense(h, i, torch.bfloat16, "cuda", gen=gen), _lora(h, i, 16, "cuda", gen)
    params = _params(x, in_loras + [down_lora])
    memo = {}
    with op.reuse_casts(memo), torch.set_grad_enabled(not recomputed):
        y = y_first = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, "silu", output_feeds_residual=True)
    if recomputed:
        with op.reuse_casts(memo, recomputing=True):
            y = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, "silu", output_feeds_residual=True)
    up = torch.randn(y.shape, generator=gen).to("cuda", torch.bfloat16)
    # LoRA grads are computed from bf16 operands here and cast to fp32 (PEFT uses fp32 operands): judged at bf16
    # precision. The output checked is the first pass's (a recomputation's output is left unset).
    _check_mlp(y_first, _grads([y], params, [up]), x, in_bases, in_loras, down, down_lora, "silu", up,
               torch.bfloat16)


def test_reuse_casts_shares_one_copy_per_memo(device):
    """Inside reuse_casts(memo) the compute-dtype copies of A (stacked) and s * B (block-diagonal), and the product
    x A^T, are made by the forward pass; the recomputation (recomputing=True) takes them again instead of making
    new ones. Outside any memo nothing is kept. Results are identical either way."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=gen).to(device)
    bases = [_dense(24, 32, torch.float32, device, gen=gen) for _ in range(3)]
    loras = [_lora(24, 32, r, device, gen, scale=s) for r, s in ((4, 2.0), (2, 1.0), (4, 0.5))]
    plain = op.lora_projections(x, bases, loras)
    memo = {}
    with op.reuse_casts(memo):
        first = op.lora_projections(x, bases, loras)
    made = {k: v[1] for k, v in memo.items() if isinstance(k, tuple)}
    assert sorted(k[0] for k in made) == ["A", "B", "xa"]  # stacked A, block-diagonal s * B, x A^T
    with op.reuse_casts(memo, recomputing=True):
        again = op.lora_projections(x, bases, loras)
    assert all(memo[k][1] is v for k, v in made.items())            # the recomputation made no new copy
    for a, b, c in zip(plain, first, again):
        assert torch.equal(a, b) and torch.equal(b, c)
    # Proof that x A^T came from the memo: a recomputation fed another input keeps the forward's product.
    with op.reuse_casts(memo, recomputing=True):
        other = op.lora_projections(2 * x, bases, loras)
    fresh = op.lora_projections(2 * x, bases, loras)
    assert all(not torch.equal(a, b) for a, b in zip(other, fresh))
    assert op._memoized(("A", 0), (), lambda: "made") == "made"      # no memo active: computed every time


def test_cast_storage_shares_casts_between_memos(device):
    """Two memos (two inputs' shapes) with one cast_storage: the second memo's casts are the first's tensors, written
    again with the current weights (after an update they hold the new casts); the x A^T products stay per memo.
    Results equal the plain computation's exactly (the same ops, only the memory differs)."""
    gen = torch.Generator().manual_seed(6)
    bases = [_dense(24, 32, torch.bfloat16, device, gen=gen) for _ in range(3)]
    loras = [_lora(24, 32, r, device, gen, scale=s) for r, s in ((4, 2.0), (2, 1.0), (4, 0.5))]
    storage, memos = {}, [{}, {}]
    x_short, x_long = (torch.randn(2, n, 32, generator=gen).to(device, torch.bfloat16) for n in (5, 9))
    for memo, x in zip(memos, (x_short, x_long)):
        with op.reuse_casts(memo, cast_storage=storage):
            got = op.lora_projections(x, bases, loras)
        assert all(torch.equal(a, b) for a, b in zip(got, op.lora_projections(x, bases, loras)))
    casts = [{k[0]: v[1] for k, v in memo.items() if isinstance(k, tuple) and k[0] in ("A", "B")} for memo in memos]
    assert casts[0].keys() == {"A", "B"} and all(casts[0][k] is casts[1][k] for k in "AB")
    products = [v[1] for memo in memos for k, v in memo.items() if isinstance(k, tuple) and k[0] == "xa"]
    assert [p.shape[0] for p in products] == [10, 18]
    with torch.no_grad():
        loras[1].B.mul_(3.0)  # an optimizer step: the next pass writes the new casts into the same tensors
    memo = {}
    with op.reuse_casts(memo, cast_storage=storage):
        got = op.lora_projections(x_short, bases, loras)
    assert all(torch.equal(a, b) for a, b in zip(got, op.lora_projections(x_short, bases, loras)))
    assert next(v[1] for k, v in memo.items() if isinstance(k, tuple) and k[0] == "B") is casts[0]["B"]


def test_recomputation_pairs_repeated_calls_with_their_own_products(device):
    """A group called twice in one pass (other inputs) gets each call's own x A^T back in the recomputation (fp32:
    the fused sums differ from the plain formula by reordering only, far below 1e-5)."""
    gen = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(3, 16, generator=gen).to(device) for _ in range(2))
    bases, loras = [_dense(8, 16, torch.float32, device, gen=gen)], [_lora(8, 16, 2, device, gen)]
    memo = {}
    with op.reuse_casts(memo):
        for x in (x1, x2):
            op.lora_projections(x, bases, loras)
    with op.reuse_casts(memo, recomputing=True):  # fed 2x: the base term follows the input, x A^T is the forward's
        recomputed = [op.lora_projections(2 * x, bases, loras)[0] for x in (x1, x2)]
    lora = loras[0]
    for x, got in zip((x1, x2), recomputed):
        expected = 2 * x @ bases[0].weight.T + (x @ lora.A.T) @ (lora.scale * lora.B).T
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _CountingWeight(op.DenseWeight):
    def __init__(self, weight):
        super().__init__(weight)
        self.calls = 0

    def materialize(self, dtype, slot=0):
        self.calls += 1
        return super().materialize(dtype, slot)

    def materialize_into(self, out):
        self.calls += 1
        return super().materialize_into(out)


@pytest.mark.parametrize("feeds_residual", [True, False])
def test_mlp_recomputation_skips_unused_output(feeds_residual, device):
    """In a recomputation (reuse_casts(..., recomputing=True)) an MLP whose output only feeds the residual sum
    does not materialize or multiply its down weight, and the gradients from that graph are the same."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 24, generator=gen).to(device).requires_grad_()
    gate, up = _dense(40, 24, torch.float32, device, gen=gen), _dense(40, 24, torch.float32, device, gen=gen)
    down = _CountingWeight(_dense(24, 40, torch.float32, device, gen=gen).weight)
    loras = [_lora(40, 24, 4, device, gen), _lora(40, 24, 4, device, gen), _lora(24, 40, 4, device, gen)]
    upstream = torch.randn(3, 7, 24, generator=gen).to(device)

    def grads():
        y = mlp.lora_mlp(x, [gate, up], loras[:2], down, loras[2], "silu", output_feeds_residual=feeds_residual)
        return y, _grads([y], _params(x, loras), [upstream])

    y_normal, expected = grads()
    calls_before = down.calls
    with op.reuse_casts({}, recomputing=True):
        y_recomputed, got = grads()
    forward_calls = down.calls - calls_before - 1  # the backward materializes down once for dh
    assert forward_calls == (0 if feeds_residual else 1)
    if not feeds_residual:
        assert torch.equal(y_recomputed, y_normal)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def _record_row_blocks(block_elements: int, monkeypatch) -> list:
    """Set MLP_ROW_BLOCK_ELEMENTS; returns the list that gets every _row_blocks answer (one per blocked pass)."""
    monkeypatch.setattr(mlp, "MLP_ROW_BLOCK_ELEMENTS", block_elements)
    blocks, row_blocks = [], mlp._row_blocks
    monkeypatch.setattr(mlp, "_row_blocks", lambda m, inner: (blocks.append(row_blocks(m, inner)), blocks[-1])[1])
    return blocks


def _blocked_mlp_case(n_in, with_lora, device, seed):
    """x (3, 5, 24) (15 rows), gate/up (40 each, or one of 80) and down fp32 weights that count their
    materializations, LoRAs (r = 4) where with_lora says, and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    h, i = 24, 40
    x = torch.randn(3, 5, h, generator=gen).to(device).requires_grad_()
    widths = [i, i] if n_in == 2 else [2 * i]
    in_bases = [_CountingWeight(_dense(wd, h, torch.float32, device, gen=gen).weight) for wd in widths]
    in_loras = [_lora(wd, h, 4, device, gen) if on else None for wd, on in zip(widths, with_lora)]
    down = _CountingWeight(_dense(h, i, torch.float32, device, gen=gen).weight)
    down_lora = _lora(h, i, 4, device, gen) if with_lora[-1] else None
    return x, in_bases, in_loras, down, down_lora, torch.randn(3, 5, h, generator=gen).to(device)


@pytest.mark.parametrize("activation,n_in,with_lora", MLP_CASES)
@pytest.mark.parametrize("block_elements", [7 * 40, 1 << 20])
@pytest.mark.parametrize("first_pass", ["autograd", "no_grad"])
def test_mlp_checkpointing_passes_by_row_blocks(activation, n_in, with_lora, block_elements, first_pass, device,
                                               monkeypatch):
    """Gradient checkpointing's two passes over an MLP whose output only feeds the residual sum, in blocks of 7 rows
    (the last of the 15 shorter) or one block. The first pass fills the memo: under no_grad (as checkpointing runs
    it) the output is computed by blocks of rows, equal to the autograd node's. The recomputation saves no gate |
    up and projects nothing; its backward makes gate | up by blocks, materializing each weight once. Outputs and
    gradients are those of the plain definition to fp32 rounding (the same products; dA_down and dB of gate/up
    summed over blocks in another order: the tolerance of this file)."""
    blocks = _record_row_blocks(block_elements, monkeypatch)
    x, in_bases, in_loras, down, down_lora, upstream = _blocked_mlp_case(n_in, with_lora, device, seed=6)
    params = _params(x, in_loras + [down_lora])
    expected_blocks = [(0, 7), (7, 14), (14, 15)] if block_elements == 7 * 40 else [(0, 15)]

    memo = {}
    with op.reuse_casts(memo), torch.set_grad_enabled(first_pass == "autograd"):
        y_first = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation, output_feeds_residual=True)
    assert len(blocks) == (first_pass == "no_grad") and all(len(b) == len(expected_blocks) for b in blocks)
    blocks.clear()
    counts = [b.calls for b in in_bases + [down]]
    with op.reuse_casts(memo, recomputing=True):
        y = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation, output_feeds_residual=True)
    assert [b.calls for b in in_bases + [down]] == counts  # nothing projected in the recomputation
    got = _grads([y], params, [upstream])
    assert [b.calls - c for b, c in zip(in_bases + [down], counts)] == [1] * (n_in + 1)
    assert [[(r.start, r.stop) for r in b] for b in blocks] == [expected_blocks]
    _check_mlp(y_first, got, x, in_bases, in_loras, down, down_lora, activation, upstream, torch.float32)


@pytest.mark.parametrize("activation,n_in,with_lora", MLP_CASES)
def test_mlp_checkpointing_passes_fold_quantized_gate_up(activation, n_in, with_lora, device, monkeypatch):
    """The same two passes in bf16 over 4-bit gate/up (one NF4 and one LLM.int8 weight when separate) and an NF4
    down: where gate or up has a LoRA, both blocked passes (the first under no_grad, the backward) fold the LoRA
    terms into the base GEMM (_folded_weight: [W_g; W_u | s B], the weights written into columns of a wider buffer),
    else they project as before; where down has one, the backward folds its LoRA term into dh's GEMM
    (_stacked_weight: [W_d; A_d]); outputs and gradients are within the bf16 tolerance of this file of the fp64
    result (the folded GEMMs sum the same products in one accumulation). The same passes in fp32 do not fold."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    folds, stacks = [], []
    fold, stack = op._folded_weight, op._stacked_weight
    monkeypatch.setattr(mlp, "_folded_weight", lambda *args, **kw: (folds.append(1), fold(*args, **kw))[1])
    monkeypatch.setattr(mlp, "_stacked_weight", lambda *args, **kw: (stacks.append(1), stack(*args, **kw))[1])
    _record_row_blocks(7 * 40, monkeypatch)
    gen = torch.Generator().manual_seed(9)
    h, i = 64, 40  # h: a multiple of the quant blocksize, as the strided dequantization needs on the GPU
    x = torch.randn(3, 5, h, generator=gen).to(device, torch.bfloat16).requires_grad_()
    widths = [i, i] if n_in == 2 else [2 * i]

    in_bases = [_nf4(widths[0], h, device, gen)]
    if n_in == 2:
        cb, scb, _ = bnbf.int8_vectorwise_quant(torch.randn(i, h, generator=gen).to(device).half())
        in_bases.append(op.Int8Weight(cb, scb))
    in_loras = [_lora(wd, h, 4, device, gen) if on else None for wd, on in zip(widths, with_lora)]
    down, down_lora = _nf4(h, i, device, gen), _lora(h, i, 4, device, gen) if with_lora[-1] else None
    upstream = torch.randn(3, 5, h, generator=gen).to(device, torch.bfloat16)
    y_first, got = _checkpointing_passes(x, in_bases, in_loras, down, down_lora, activation, upstream)
    assert len(folds) == (2 if any(with_lora[:n_in]) else 0)
    assert len(stacks) == (1 if with_lora[-1] else 0)  # dh = [dy | dy s B_d] [W_d; A_d] in the blocked backward
    _check_mlp(y_first, got, x, in_bases, in_loras, down, down_lora, activation, upstream, torch.bfloat16)
    folds.clear(), stacks.clear()
    x32 = x.detach().float().requires_grad_()
    _checkpointing_passes(x32, in_bases, in_loras, down, down_lora, activation, upstream.float())
    assert not folds and not stacks


def _checkpointing_passes(x, in_bases, in_loras, down, down_lora, activation, upstream):
    """(output, gradients of x and the LoRA matrices) of the MLP as offloaded checkpointing runs it: a first pass
    under no_grad, then the recomputation (output feeding the residual sum) and its backward."""
    memo = {}
    with op.reuse_casts(memo), torch.no_grad():
        y_first = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation, output_feeds_residual=True)
    with op.reuse_casts(memo, recomputing=True):
        y = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation, output_feeds_residual=True)
    return y_first, _grads([y], _params(x, in_loras + [down_lora]), [upstream])


@pytest.mark.parametrize("activation,n_in,with_lora", MLP_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_unblocked_and_checkpointed_agree_to_the_bit(activation, n_in, with_lora, dtype, device):
    """16-bit compute, NF4 weights, one block of rows: the MLP as one autograd node (no checkpointing, or an
    evaluation with grad) and as offloaded checkpointing runs it (blocked first pass and backward) give the same
    output and gradients to the bit: both make gate | up the same way (folded when they have a LoRA), so training
    after an evaluation computes what it computed before (tests/test_lora.py's check on the GPU)."""
    gen = torch.Generator().manual_seed(12)
    h, i = 64, 40
    widths = [i, i] if n_in == 2 else [2 * i]
    in_bases, down = [_nf4(wd, h, device, gen, dtype) for wd in widths], _nf4(h, i, device, gen, dtype)
    in_loras = [_lora(wd, h, 4, device, gen) if on else None for wd, on in zip(widths, with_lora)]
    down_lora = _lora(h, i, 4, device, gen) if with_lora[-1] else None
    x = torch.randn(3, 5, h, generator=gen).to(device, dtype).requires_grad_()
    upstream = torch.randn(3, 5, h, generator=gen).to(device, dtype)
    y = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation)
    unblocked = _grads([y], _params(x, in_loras + [down_lora]), [upstream])
    y_first, checkpointed = _checkpointing_passes(x, in_bases, in_loras, down, down_lora, activation, upstream)
    assert torch.equal(y_first, y)
    assert len(unblocked) == len(checkpointed) and all(torch.equal(a, b) for a, b in zip(unblocked, checkpointed))


@pytest.mark.parametrize("activation", mlp.ACTIVATIONS)
def test_mlp_h_from_activation_backward_changes_no_bit(activation, device, monkeypatch):
    """The blocked backward takes h for dA_down from the activation's backward kernel (written over dh) instead of
    a second pass of the forward kernel (H_FROM_BACKWARD off, as before run 106): both kernels compute h by one
    expression in one order, so every gradient is the same to the bit, here over 3 blocks of rows in bf16 with
    LoRA on all three projections."""
    _record_row_blocks(7 * 40, monkeypatch)
    gen = torch.Generator().manual_seed(13)
    h, i = 64, 40
    in_bases, down = [_dense(i, h, torch.bfloat16, device, gen=gen) for _ in range(2)], \
        _dense(h, i, torch.bfloat16, device, gen=gen)
    in_loras, down_lora = [_lora(i, h, 4, device, gen) for _ in range(2)], _lora(h, i, 4, device, gen)
    x = torch.randn(3, 5, h, generator=gen).to(device, torch.bfloat16).requires_grad_()
    upstream = torch.randn(3, 5, h, generator=gen).to(device, torch.bfloat16)
    grads = {}
    for from_backward in (True, False):
        monkeypatch.setattr(mlp, "H_FROM_BACKWARD", from_backward)
        grads[from_backward] = _checkpointing_passes(x, in_bases, in_loras, down, down_lora, activation, upstream)[1]
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def _fold_errors(h: int, i: int, rows: int, device, monkeypatch) -> dict:
    """{name: (folded, unfolded) relative Frobenius errors against fp64} of the bf16 checkpointing passes over an
    MLP of width h, i with NF4 weights and r=16 LoRAs with nonzero B, `rows` rows: gate | up's LoRA terms and
    down's in dh folded into the base GEMMs, and added by second GEMMs (as before runs 68 and 75)."""
    gen = torch.Generator().manual_seed(11)
    in_bases, down = [_nf4(i, h, device, gen), _nf4(i, h, device, gen)], _nf4(h, i, device, gen)
    loras = [_lora(n, k, 16, device, gen, scale=1.0) for n, k in ((i, h), (i, h), (h, i))]
    x = torch.randn(1, rows, h, generator=gen).to(device, torch.bfloat16).requires_grad_()
    upstream = torch.randn(1, rows, h, generator=gen).to(device, torch.bfloat16)
    folded = _checkpointing_passes(x, in_bases, loras[:2], down, loras[2], "silu", upstream)
    with monkeypatch.context() as patch:
        patch.setattr(mlp, "_foldable", lambda bases, b_bd: False)
        patch.setattr(mlp, "_input_grad_foldable", lambda a_all: False)
        unfolded = _checkpointing_passes(x, in_bases, loras[:2], down, loras[2], "silu", upstream)
    x64, loras64 = x.detach().double().requires_grad_(), [_lora64(lo) for lo in loras]
    exact = mlp.reference_mlp(x64, [_to64(b) for b in in_bases], loras64[:2], _to64(down), loras64[2], "silu")
    exact_grads = _grads([exact], _params(x64, loras64), [upstream.double()])
    names = ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]
    return {name: tuple(float((t.detach().double() - e).norm() / e.norm()) for t in (f, u))
            for name, f, u, e in zip(names, [folded[0], *folded[1]], [unfolded[0], *unfolded[1]],
                                     [exact, *exact_grads])}


@pytest.mark.parametrize("shape", ["small", pytest.param("llama-8b", marks=pytest.mark.gpu)])
def test_folded_gate_up_is_no_less_accurate(shape, device, monkeypatch):
    """The bf16 checkpointing passes with gate | up's LoRA terms (and down's, in dh) folded into the base GEMMs
    against the same with them added by second GEMMs: the output and every gradient are no further from the fp64
    result (relative Frobenius error) than unfolded, within 5%, and under 1%: the two round the same products to
    bf16, the folded one once fewer; a misplaced or missing LoRA term would be off by far more. Shapes: small
    (H 128, I 320, 45 rows), and on the GPU Llama-3.1-8B's MLP (H 4096, I 14336) over 1,792 rows (blocks of 1,152
    and 640)."""
    h, i, rows = (128, 320, 45) if shape == "small" else (4096, 14336, 1792)
    for name, (error_f, error_u) in _fold_errors(h, i, rows, device, monkeypatch).items():
        print(f"{name}: relative error folded {error_f:.4g}, unfolded {error_u:.4g}")  # shown by pytest -rP
        assert error_f <= 1.05 * error_u and error_u < 1e-2, f"{name}: folded {error_f:.3g}, unfolded {error_u:.3g}"


@pytest.mark.parametrize("dtype,k,width,offset", [
    (torch.bfloat16, 12, 16, 0),   # 8-byte words
    (torch.bfloat16, 6, 10, 0),    # 4-byte words (12 bytes per row)
    (torch.bfloat16, 7, 9, 0),     # element by element (14 bytes per row)
    (torch.float32, 4, 6, 0),      # 8-byte words
    (torch.bfloat16, 12, 17, 1),   # rows and start off the word size: element by element
    (torch.float16, 8, 8, 0),      # contiguous
])
def test_copy_into_rows_of_a_wider_matrix(dtype, k, width, offset, device):
    """_copy_into (16-bit weights into the folded workspaces) writes exactly src into out's columns, in words where
    sizes, strides and alignment allow, and nothing next to them."""
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(5, k, generator=gen).to(device, dtype)
    buffer = torch.full((5, width + offset), 7.0, dtype=dtype, device=device)
    out = buffer[:, offset:offset + k]
    assert op._copy_into(out, src) is out
    assert torch.equal(out, src)
    rest = torch.cat([buffer[:, :offset], buffer[:, offset + k:]], dim=1)
    assert torch.equal(rest, torch.full_like(rest, 7.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_gradient_products_are_fp32_on_cuda(dtype, device):
    """lora_grad_product (a LoRA gradient's sum over rows) and the blocked MLP's _add_block_product (3 blocks of 50
    rows, odd widths). On CUDA both are the fp32 sum of the exact 16-bit products: within 1e-5 of the largest entry
    of the fp64 result (fp32 accumulation over 150 terms errs ~1e-7 of it; the output rounded to the operands' dtype,
    as before run 118's change, errs up to 2^-8 (bf16) or 2^-11 (fp16) of each entry, and fails the bound in both dtypes:
    bench/RESULTS.md run 120), and one block gives lora_grad_product's bits. Elsewhere each is the product in the
    operands' dtype, as PyTorch's matmul makes it, the blocks' products summed in fp32."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(150, 13, generator=gen).to(device, dtype)
    b = torch.randn(150, 37, generator=gen).to(device, dtype)
    blocks = [slice(0, 50), slice(50, 100), slice(100, 150)]
    whole = op.lora_grad_product(a.T, b)
    summed, one_block = (torch.empty(13, 37, dtype=torch.float32, device=device) for _ in range(2))
    for i, rows in enumerate(blocks):
        mlp._add_block_product(summed, a[rows].T, b[rows], first=i == 0)
    mlp._add_block_product(one_block, a.T, b, first=True)
    if device == "cuda":
        exact = a.double().T @ b.double()
        assert whole.dtype == torch.float32 and torch.equal(one_block, whole)
        for name, got in (("whole", whole), ("by blocks", summed)):
            error = float((got.double() - exact).abs().max() / exact.abs().max())
            assert error <= 1e-5, f"{name}: {error:.3g} of the largest entry"
    else:
        assert whole.dtype == dtype and torch.equal(whole, a.T @ b)
        assert torch.equal(one_block, whole.float())
        expected = (a[blocks[0]].T @ b[blocks[0]]).float()
        for rows in blocks[1:]:
            expected += a[rows].T @ b[rows]
        assert torch.equal(summed, expected)


def test_mlp_row_blocks():
    """Blocks of MLP_ROW_BLOCK_ELEMENTS / I rows, a multiple of 128 once that large, the last one shorter."""
    assert mlp._row_blocks(8192, 8192) == [slice(s, s + 2048) for s in range(0, 8192, 2048)]
    assert [b.stop - b.start for b in mlp._row_blocks(4096, 14336)] == [1152, 1152, 1152, 640]
    assert mlp._row_blocks(5, 1 << 30) == [slice(i, i + 1) for i in range(5)]
    assert mlp._row_blocks(300, 1 << 16) == [slice(0, 256), slice(256, 300)]


@pytest.mark.parametrize("activation,n_in,with_lora", MLP_CASES)
def test_tiled_mlp_saves_x_only_and_matches(activation, n_in, with_lora, device, monkeypatch):
    """tiled=True (unsloth_tiled_mlp): the forward runs by blocks of rows (7 of the 15 rows, the last block shorter)
    and backward makes gate | up again by blocks, with autograd on and no checkpointing; output and gradients are
    those of the plain definition to fp32 rounding (the tolerance of this file), and the node keeps no (M, 2I)."""
    blocks = _record_row_blocks(7 * 40, monkeypatch)
    x, in_bases, in_loras, down, down_lora, upstream = _blocked_mlp_case(n_in, with_lora, device, seed=8)
    h, i = x.shape[-1], down.shape[1]
    params = _params(x, in_loras + [down_lora])
    y = mlp.lora_mlp(x, in_bases, in_loras, down, down_lora, activation, tiled=True)
    saved = [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None]
    assert (15, h) in saved and not any(s[0] == 15 and s[-1] in (i, 2 * i) for s in saved)  # x kept, no gate | up, h
    got = _grads([y], params, [upstream])
    assert [[(r.start, r.stop) for r in b] for b in blocks] == [[(0, 7), (7, 14), (14, 15)]] * 2  # forward, backward
    _check_mlp(y, got, x, in_bases, in_loras, down, down_lora, activation, upstream, torch.float32)
