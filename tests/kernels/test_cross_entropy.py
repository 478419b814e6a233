"""Fused linear + cross-entropy vs the full-logits reference (transformers' ForCausalLMLoss).

Every case: loss and the gradients w.r.t. hidden, weight and bias, with a random upstream gradient,
checked by assert_no_worse_than_reference against fp64 math on the upcast inputs. Buffers the op
preallocates are filled with NaN first (fixture below), so every element must be written.
"""
import math

import pytest
import torch

import fastlm.kernels.cross_entropy as ce
from fastlm.kernels.cross_entropy import fused_linear_cross_entropy, reference
from tests.kernels.check import ULP, assert_no_worse_than_reference

# Smallest positive (subnormal) step of each dtype: gradients of far-off vocab entries (~1e-7) are
# subnormal in fp16, where both the reference and the kernel round them to this absolute grid.
TINY = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133, torch.float32: 2.0**-149}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ce, "_POISON", True)


def _inputs(shape, vocab, dtype, device, bias=False, seed=0):
    """Hidden ~ N(0, 1), weight ~ N(0, 1/H) so logits ~ N(0, 1) like a trained lm_head; labels uniform,
    about one row in five ignored (and the first one always, so every case has ignored rows)."""
    g = torch.Generator().manual_seed(seed)
    hid = shape[-1]
    h = torch.randn(shape, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hid, generator=g) / math.sqrt(hid)).to(device, dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(device, dtype) if bias else None
    labels = torch.randint(0, vocab, shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < 0.2] = -100
    labels.view(-1)[0] = -100
    return h, w, b, labels.to(device)


def _host_copy(w, device):
    """The weight's values where offload_lm_head keeps them: pinned host memory on the GPU, the tensor itself on
    the CPU."""
    return w.cpu().pin_memory() if device == "cuda" else w


def _exact(h, w, b, labels, softcap, logit_scale, shift, num_items, reduction):
    """fp64 loss and its gradients w.r.t. (h, w, b), and d loss / d raw logits (for the tolerances)."""
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    raw = torch.nn.functional.linear(h, w, b).reshape(-1, w.shape[0])
    raw.retain_grad()
    z = raw * logit_scale if logit_scale is not None else raw
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if shift:
        labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    labels = labels.reshape(-1)
    valid = labels != -100
    rows = torch.logsumexp(z, -1) - z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    total = (rows * valid).sum()
    denom = float(num_items) if num_items is not None else (valid.sum() if reduction == "mean" else 1)
    loss = total / denom
    loss.backward()
    grads = (h.grad, w.grad, None if b is None else b.grad)
    return loss.detach(), grads, raw.grad, z.detach(), valid.sum().item() / float(denom)


def _check(shape, vocab, dtype, device, bias=False, need=(True, True, True), softcap=None, logit_scale=None,
           shift=False, num_items=None, reduction="mean", chunk_rows=None, seed=0, streamed_rows=None):
    """streamed_rows: stream the weight from host memory (offload_lm_head) in blocks of this many vocabulary rows
    (then chunk_rows is the rows of one logits block)."""
    h, w, b, labels = _inputs(shape, vocab, dtype, device, bias, seed)
    go = torch.randn((), generator=torch.Generator().manual_seed(seed + 1)).item()  # random upstream grad
    kw = dict(softcap=softcap, logit_scale=logit_scale, shift_labels=shift, num_items_in_batch=num_items,
              reduction=reduction)
    if streamed_rows is not None:
        kw_fast = dict(host_weight=_host_copy(w, device), chunk_bytes=streamed_rows * w.shape[1] * w.element_size())
    else:
        kw_fast = {}
    outs = []
    for fn in (lambda *a, **k: fused_linear_cross_entropy(*a, chunk_rows=chunk_rows, **k, **kw_fast), reference):
        leaves = [t.clone().requires_grad_(n) if t is not None else None for t, n in zip((h, w, b), need)]
        loss = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(loss * go, wanted))
        outs.append((loss, [next(grads) if t is not None and t.requires_grad else None for t in leaves]))
    (loss, grads), (ref_loss, ref_grads) = outs
    ex_loss, ex_grads, dlogits, z, valid_per_denom = _exact(h, w, b, labels, softcap, logit_scale, shift,
                                                            num_items, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # Loss: both start from the same dtype logits; the kernel's fp32 online log-sum-exp and row sum run
    # in another order than PyTorch's: 64 fp32 ulps relative (log2 of 32003 terms, twice, with slack).
    # Where the two round the logits differently their errors are independent draws, and a single
    # scalar of the reference may land luckily close: the reference rounds scaled / softcapped logits
    # to the dtype again (the kernel keeps them in fp32), and on the GPU the chunked GEMM may pick another
    # cuBLAS kernel than the full one. A half-ulp change of every logit moves a row loss by at most
    # ulp * max|z| (half for the label, half for the softmax average): summed over rows / denom.
    rounds_differently = device == "cuda" or softcap is not None or logit_scale is not None
    atol = ULP[dtype] * z.abs().max().item() * valid_per_denom if rounds_differently else 0.0
    assert_no_worse_than_reference(loss, ref_loss, ex_loss, atol=atol, rtol=64 * ULP[torch.float32], name="loss")
    # Gradients: scale S = |go| * (|dlogits| @ |W|) (for hidden; |dlogits|^T @ |h| for W, column sums for
    # b) is what a relative error on every dlogit turns into. The kernel's dlogits may be one ulp off the
    # reference's (the interpreter truncates fp32 -> dtype at the store): 1 x S; the gradient itself is
    # rounded to the dtype independently of the reference's rounding, and the final multiplication by
    # grad_output rounds it once more: rtol one ulp; the weight gradient is rounded once per chunk
    # in the weight dtype (see the kernel file): n_chunks x S; on the GPU a different rounding of the
    # logits (see above) changes each softmax entry by up to ulp * 2 max|z|: 2 max|z| x S. Subnormal
    # dlogits (fp16) are off by up to TINY absolute each: TINY x |go| x the same products with ones.
    # In fp32 the kernel's own math matters: exp(z - lse) with |z - lse| <= max|z| + lse carries
    # (max|z| + lse) fp32 ulps of relative error, plus a few ulps for exp and the log-sum-exp: 8 + that.
    rows = h.numel() // h.shape[-1]
    n_chunks = math.ceil(rows / chunk_rows) if chunk_rows else 1
    zmax = z.abs().max().item()
    k = 1 + (2 * zmax if device == "cuda" else 0) + (8 + 2 * zmax + math.log(vocab)) * ULP[torch.float32] / ULP[dtype]
    d_abs, h64, w64 = dlogits.abs(), h.double().reshape(-1, h.shape[-1]), w.double()
    scales = (d_abs @ w64.abs(), d_abs.t() @ h64.abs(), d_abs.sum(0))
    tiny = ((d_abs > 0).double() @ w64.abs(), (d_abs > 0).double().t() @ h64.abs(), (d_abs > 0).double().sum(0))
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for i, (g, rg, eg) in enumerate(zip(grads, ref_grads, ex_grads)):
        if g is None:
            assert rg is None
            continue
        kk = k + (n_chunks if i == 1 else 0)
        atol = abs(go) * (kk * ULP[dtype] * scales[i] + TINY[dtype] * tiny[i]).reshape(eg.shape)
        assert g.dtype == dtype
        # atol is a tensor (elementwise bounds); check.py's formula broadcasts it
        assert_no_worse_than_reference(g, rg, eg * go, atol=atol, rtol=ULP[dtype], name=names[i])


# Cases: every dtype at both vocabularies (odd 32003 needs 4 vocab blocks per row: the online
# log-sum-exp across blocks), then each option alone and in combination.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 32003])
def test_plain_and_bias(device, dtype, vocab):
    _check((3, 5, 129), vocab, dtype, device, bias=(vocab == 32003))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(device, dtype):
    _check((3, 5, 129), 1000, dtype, device, softcap=2.0)  # cap 2 with logits ~ N(0, 1): tanh really bends


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logit_scale(device, dtype):
    _check((17, 64), 1000, dtype, device, logit_scale=0.0625, bias=True)  # Cohere-like 1/16


def test_shift_labels(device):
    _check((3, 5, 129), 1000, torch.bfloat16, device, shift=True)


@pytest.mark.parametrize("num_items", [23, "tensor"])
def test_num_items_in_batch(device, num_items):
    num_items = torch.tensor(23, device=device) if num_items == "tensor" else num_items
    _check((3, 5, 129), 1000, torch.bfloat16, device, num_items=num_items)


def test_reduction_sum(device):
    _check((3, 5, 129), 1000, torch.float32, device, reduction="sum")


def test_all_options_several_chunks(device):
    _check((3, 5, 129), 32003, torch.bfloat16, device, bias=True, softcap=30.0 / 16, logit_scale=0.5,
           shift=True, num_items=torch.tensor(37), chunk_rows=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_chunks(device, dtype):
    _check((2, 9, 65), 1000, dtype, device, bias=True, chunk_rows=5)  # 18 rows: chunks 5, 5, 5, 3


@pytest.mark.parametrize("need", [(True, False, False), (False, True, True)])
def test_frozen_weight_or_frozen_hidden(device, need):
    _check((3, 5, 129), 1000, torch.bfloat16, device, bias=True, need=need, chunk_rows=8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(device, reduction):
    h, w, _, labels = _inputs((2, 3, 33), 1000, torch.bfloat16, device)
    labels[:] = -100
    h.requires_grad_(), w.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction)
    ref = reference(h, w, labels, reduction=reduction)
    # mean over zero rows is 0/0 = NaN, exactly as PyTorch's cross_entropy; the gradients are zero.
    assert torch.equal(loss.isnan(), ref.isnan()) and (reduction == "mean") == bool(loss.isnan())
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert not gh.any() and not gw.any()


@pytest.mark.parametrize("counted", [False, True], ids=["count-read-at-loss", "LabelledCount"])
@pytest.mark.parametrize("ignored", ["some", "none"])
def test_ignored_rows_are_left_out_of_the_gemms(device, monkeypatch, ignored, counted):
    """Only labelled rows reach the chunked lm_head (the loss and gradients of the other cases prove the result
    unchanged); with every row labelled all of them do, and the result is the reference's, whether the loss
    counts the rows itself or is handed a LabelledCount. fp32 tolerance as test_no_grad_and_non_contiguous_hidden:
    64 ulps for the loss, the gradients likewise (one GEMM of K = vocab per element, summed in another order than
    the reference's full-logits GEMM)."""
    seen = []
    chunked = ce._chunked_loss_and_grads
    monkeypatch.setattr(ce, "_chunked_loss_and_grads",
                        lambda h, *a, **k: (seen.append(h.shape[0]), chunked(h, *a, **k))[1])
    h, w, _, labels = _inputs((3, 7, 40), 1000, torch.float32, device)
    if ignored == "none":
        labels[labels == -100] = 5
    h.requires_grad_(), w.requires_grad_()
    count = ce.LabelledCount(labels) if counted else None
    loss = fused_linear_cross_entropy(h, w, labels, chunk_rows=4, labelled_count=count)
    assert seen == [int((labels != -100).sum())] and (seen[0] < 21) == (ignored == "some")
    ref = reference(h, w, labels)
    torch.testing.assert_close(loss, ref, rtol=64 * ULP[torch.float32], atol=0)
    tol = 64 * ULP[torch.float32]
    for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    if ignored == "some":
        assert not torch.autograd.grad(fused_linear_cross_entropy(h, w, labels), h)[0][labels == -100].any()


def test_labelled_count_with_shifted_labels(device):
    """LabelledCount(shift_labels=True) counts what the shifted loss keeps: a row's first label is never a target."""
    labels = torch.tensor([[-100, 3, -100, 4], [7, -100, 1, 2]], device=device)
    assert ce.LabelledCount(labels, shift_labels=True).value() == 4
    assert ce.LabelledCount(labels).value() == 5
    assert ce.LabelledCount(labels, ignore_index=3).value() == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on a GPU only")
def test_loss_with_a_labelled_count_never_syncs():
    """With a LabelledCount made beforehand, the fused loss forward and backward launch without one host sync (torch
    raises on any synchronizing op in sync-debug "error" mode), ignored rows and all; without it, the one sync of
    reading the count is there."""
    h, w, _, labels = _inputs((2, 300, 64), 5000, torch.bfloat16, "cuda")
    h.requires_grad_(), w.requires_grad_()
    count = ce.LabelledCount(labels, shift_labels=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_linear_cross_entropy(h, w, labels, shift_labels=True, labelled_count=count).backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            fused_linear_cross_entropy(h, w, labels, shift_labels=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_no_grad_and_non_contiguous_hidden(device):
    h, w, b, labels = _inputs((5, 3, 40), 1000, torch.float32, device, bias=True)
    h = h.transpose(0, 1)  # (3, 5, 40) view, not contiguous
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, labels.t(), b, softcap=3.0)
        ref = reference(h, w, labels.t(), b, softcap=3.0)
    torch.testing.assert_close(loss, ref, rtol=64 * ULP[torch.float32], atol=0)


def test_backward_runs_once(device):
    h, w, _, labels = _inputs((4, 16), 100, torch.float32, device)
    loss = fused_linear_cross_entropy(h.requires_grad_(), w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_cpu_fallback_is_reference(monkeypatch):
    monkeypatch.setattr(ce, "use_triton", lambda *t: False)
    h, w, _, labels = _inputs((4, 16), 100, torch.float32, "cpu")
    assert torch.equal(fused_linear_cross_entropy(h, w, labels, softcap=2.0), reference(h, w, labels, softcap=2.0))


def test_chunk_rule():
    # Llama-3 shapes: 128 MiB / (128256 x 2 bytes) = 523 rows -> 512 (a multiple of 128); extra memory
    # = logits chunk + grad_h (16384 x 4096 bf16) stays under 512 MB.
    rows = ce._rows_per_chunk(16384, 128256, 2, ce.DEFAULT_CHUNK_BYTES)
    assert rows == 512 and rows * 128256 * 2 + 16384 * 4096 * 2 < 512e6
    assert ce._rows_per_chunk(1100, 128256, 2, 2 * ce.DEFAULT_CHUNK_BYTES) == 640  # balanced: 640 + 460
    assert ce._rows_per_chunk(1100, 128256, 2, ce.DEFAULT_CHUNK_BYTES) == 384  # balanced: 384 + 384 + 332
    assert ce._rows_per_chunk(10, 128256, 2, ce.DEFAULT_CHUNK_BYTES) == 10
    assert ce._rows_per_chunk(100, 1000, 4, 4000 * 7) == 7  # tiny caps: no rounding to 128


@pytest.mark.gpu
@pytest.mark.parametrize("trainable", [False, True])
def test_peak_memory_far_below_full_logits(trainable):
    torch.manual_seed(0)
    n, hid, vocab = 8192, 4096, 128256
    h = torch.randn(n, hid, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hid, device="cuda") / hid**0.5).to(torch.bfloat16).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (n,), device="cuda")
    labels[::7] = -100

    def peak(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(h, w, labels)
        loss.backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, loss.detach(), h.grad.clone()

    ours, loss, gh = peak(fused_linear_cross_entropy)
    full, ref_loss, ref_gh = peak(reference)
    grads_mib = (h.numel() + (w.numel() if trainable else 0)) * 2 / 2**20  # the gradients themselves
    assert ours - grads_mib < 512e6 / 2**20 and ours < full / 4, (ours, full)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2 * ULP[torch.bfloat16], atol=1e-7)


# ---------------------------------------------------------------- the weight streamed from host memory
# (offload_lm_head: fastlm/kernels/streamed_cross_entropy.py). Same checks and tolerances as above: the streamed
# schedule rounds each e_j = exp(z_j - m) to the dtype (a relative ulp on each softmax entry, like dlogits above),
# sums in fp32 and rounds grad_hidden once; its label term is fp32 (more exact than the reference's p - 1). Blocks
# of an odd number of vocabulary rows, so the last block is ragged and every label position in a block occurs.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab, block", [(1000, 97), (32003, 9001)], ids=["11-blocks", "4-blocks-of-2-steps"])
def test_streamed_weight(device, dtype, vocab, block):
    _check((3, 5, 129), vocab, dtype, device, need=(True, False, False), streamed_rows=block)


def test_streamed_weight_options_and_row_chunks(device):
    _check((2, 9, 65), 1000, torch.bfloat16, device, need=(True, False, False), shift=True,
           num_items=torch.tensor(23), chunk_rows=4, streamed_rows=250)  # 18 rows: logits blocks of 4, 4, 4, 4, 2


def test_streamed_weight_sum_and_frozen_hidden(device):
    _check((3, 5, 129), 1000, torch.float32, device, need=(True, False, False), reduction="sum", streamed_rows=300)
    h, w, _, labels = _inputs((3, 5, 129), 1000, torch.float32, device)
    host = _host_copy(w, device)
    loss = fused_linear_cross_entropy(h, w, labels, host_weight=host, chunk_bytes=300 * 129 * 4)  # no grad: loss only
    torch.testing.assert_close(loss, reference(h, w, labels), rtol=64 * ULP[torch.float32], atol=0)


def test_streamed_weight_all_rows_ignored(device):
    h, w, _, labels = _inputs((2, 3, 33), 1000, torch.bfloat16, device)
    labels[:] = -100
    host = _host_copy(w, device)
    h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", host_weight=host, chunk_bytes=100 * 33 * 2)
    assert loss.item() == 0.0
    (gh,) = torch.autograd.grad(loss, (h,))
    assert not gh.any()


def test_streamed_weight_refuses_what_it_does_not_do(device):
    h, w, b, labels = _inputs((2, 3, 33), 100, torch.float32, device, bias=True)
    for kwargs in (dict(bias=b), dict(softcap=2.0), dict(logit_scale=0.5)):
        with pytest.raises(ValueError, match="no bias, softcap or logit_scale"):
            fused_linear_cross_entropy(h, w, labels, host_weight=w.cpu(), **kwargs)
    with pytest.raises(ValueError, match="leaves the weight frozen"):
        fused_linear_cross_entropy(h, w.requires_grad_(), labels, host_weight=w.detach().cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_linear(device, dtype):
    """Logits through the streamed weight (the offloaded lm_head's forward) against F.linear, and the gradient of
    x (its backward streams the weight again, sums in fp32, rounds once). Forward: each block is the same matmul
    as a slice of the full one: equal up to cuBLAS picking another kernel for the narrower shape on the GPU (one
    ulp of the output; in fp32 that kernel may also sum the K = 65 products in another order: log2(K) + 2 fp32 ulps
    of the sum of |terms|, 2.4 ulps seen on the H200). Backward: K = vocab products summed in fp32 in another order
    than the reference's (block by block), then rounded once: no worse than the reference plus one ulp of the dtype
    plus the same summation-order term."""
    from fastlm.kernels.streamed_cross_entropy import streamed_linear
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 65, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(1001, 65, generator=g) / 8).to(device, dtype)
    host = _host_copy(w, device)
    out = streamed_linear(x, host, block_bytes=97 * 65 * w.element_size())  # 11 blocks, the last ragged
    ref = torch.nn.functional.linear(x, w)
    exact = torch.nn.functional.linear(x.double(), w.double())
    assert out.shape == ref.shape and out.dtype == dtype
    order = (math.log2(x.shape[-1]) + 2) * ULP[torch.float32] * (x.detach().double().abs() @ w.double().abs().t())
    assert_no_worse_than_reference(out, ref, exact, atol=order, rtol=ULP[dtype], name="logits")
    go = torch.randn(out.shape, generator=g).to(device, dtype)
    (gx,) = torch.autograd.grad(out, x, go)
    (ref_gx,) = torch.autograd.grad(ref, x, go)
    order = (math.log2(w.shape[0]) + 2) * ULP[torch.float32] * (go.double().abs() @ w.double().abs())
    assert_no_worse_than_reference(gx, ref_gx, go.double() @ w.double(), atol=order, rtol=ULP[dtype], name="grad_x")


def test_streamed_linear_casts_its_input_to_the_weight_dtype(device):
    """An fp32 input meets a bf16 weight as under autocast: cast first, bf16 logits, each block a slice of the same
    matmul (equal on the CPU; one bf16 ulp of the output allowed for cuBLAS' kernel choice on the GPU)."""
    from fastlm.kernels.streamed_cross_entropy import streamed_linear
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 33, generator=g).to(device)
    w = (torch.randn(300, 33, generator=g) / 6).to(device, torch.bfloat16)
    host = _host_copy(w, device)
    out = streamed_linear(x, host, block_bytes=64 * 33 * 2)
    ref = torch.nn.functional.linear(x.to(torch.bfloat16), w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=ULP[torch.bfloat16] if device == "cuda" else 0, atol=0)
