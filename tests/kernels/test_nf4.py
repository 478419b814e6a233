"""NF4/FP4 dequantization: bit-exact (torch.equal) with bitsandbytes.functional.dequantize_4bit; the fused
4-bit matmul against x @ dequant(W).T under the tolerance rule of check.py.

Weights are quantized by bitsandbytes itself (functional.quantize_4bit, and nn.Linear4bit / Params4bit) on
the test device, so on the H200 the reference is bitsandbytes' CUDA kernel and here its CPU kernel.

Shape choice: bitsandbytes 0.50.2's AVX-512 CPU dequantize (used when the last dim is a multiple of 16)
indexes absmax per row, row * (n // blocksize) + col // blocksize, which disagrees with its own quantizer
and its CUDA kernel (flat blocks, e // blocksize) whenever the last dim is not a multiple of the
blocksize, e.g. (40, 96) with blocksize 64. Shapes here whose blocks straddle rows therefore have a last
dim that is odd or not a multiple of 16, where bnb's CPU path is the flat-block one."""
import copy

import pytest
import torch

from fastlm.kernels import nf4
from tests.kernels.check import ULP, assert_no_worse_than_reference

F = pytest.importorskip("bitsandbytes.functional")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _quantize(shape, dtype, device, blocksize=64, nested=False, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _assert_bit_exact(packed, qs, out=None):
    expected = F.dequantize_4bit(packed, qs)
    ours = nf4.dequantize_nf4(packed, qs, out=out)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert torch.equal(ours, expected), f"{(ours != expected).sum().item()} of {ours.numel()} elements differ"
    # The plain-PyTorch explanation of the format is bit-exact too.
    assert torch.equal(nf4.reference_torch(packed, qs), expected)
    return ours


def test_code_tables_are_bitsandbytes_tables():
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(nf4._code(quant_type, "cpu"), F.get_4bit_type(quant_type, device="cpu"))


# (50, 98): 4,900 elements, last dim even but not a multiple of the block (blocks span rows; the tail
# block is partial); 76 blocks of 64 -> several kernel programs of 64 rows each.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequant_bit_exact(device, dtype, nested, blocksize):
    packed, qs = _quantize((50, 98), dtype, device, blocksize, nested)
    _assert_bit_exact(packed, qs)


# Odd last dims and odd element counts (a half-used last byte); bitsandbytes' CPU backend compiles a
# fallback for these (~1 s each), so only a few.
@pytest.mark.parametrize("shape,dtype,nested", [((37, 129), torch.bfloat16, True), ((37, 129), torch.float16, False),
                                                ((7,), torch.bfloat16, False)])
def test_dequant_bit_exact_odd_shapes(device, shape, dtype, nested):
    packed, qs = _quantize(shape, dtype, device, 64, nested)
    _assert_bit_exact(packed, qs)


# Every other blocksize bitsandbytes allows, incl. blocks larger than one kernel tile (4096: one row
# per program; 9,100 elements = 2 full blocks + a partial one).
@pytest.mark.parametrize("blocksize", [32, 256, 512, 4096])
def test_dequant_bit_exact_blocksizes(device, blocksize):
    packed, qs = _quantize((70, 130), torch.bfloat16, device, blocksize, nested=True)
    _assert_bit_exact(packed, qs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
def test_dequant_bit_exact_fp4(device, dtype, nested):
    packed, qs = _quantize((50, 98), dtype, device, 64, nested, quant_type="fp4")
    _assert_bit_exact(packed, qs)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_dequant_bit_exact_linear4bit(device, quant_storage):
    """The state a bnb.nn.Linear4bit carries (as transformers' BitsAndBytesConfig builds it), incl. a
    bf16 quant_storage (packed bytes seen through a bf16 tensor, as for FSDP)."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(40, 100, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(100, 40, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", quant_storage=quant_storage)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     quant_storage=quant_storage)
    layer = layer.to(device)
    assert layer.weight.dtype == quant_storage and layer.weight.quant_state.nested
    _assert_bit_exact(layer.weight.data, layer.weight.quant_state)


def test_dequant_into_reused_buffer(device):
    """out= is written in full (NaN poison), returned as is, may have another shape and dtype: an fp32
    buffer for a bf16-quantized weight equals bitsandbytes dequantizing that state to fp32."""
    packed, qs = _quantize((50, 98), torch.bfloat16, device, 64, nested=True)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.full((98 * 50,), float("nan"), dtype=dtype, device=device)
        ours = nf4.dequantize_nf4(packed, qs, out=out)
        assert ours is out
        qs_dtype = copy.copy(qs)
        qs_dtype.dtype = dtype
        assert torch.equal(out.view(50, 98), F.dequantize_4bit(packed, qs_dtype))


@pytest.mark.parametrize("nested", [False, True])
def test_dequant_into_columns_of_a_wider_buffer(device, nested):
    """out= a (N, K) column slice of an (N, K + 19) buffer (rows K + 19 apart, as fused LoRA's [W | s B]): the
    weight lands bit-exactly in those columns and the others keep their values (poison checked). 5 rows of 128
    with blocksize 64: two quant blocks per row, ragged last program. A width that is not a multiple of the
    blocksize (blocks straddling rows) is refused."""
    packed, qs = _quantize((5, 128), torch.bfloat16, device, 64, nested=nested)
    wide = torch.full((5, 128 + 19), float("nan"), dtype=torch.bfloat16, device=device)
    wide[:, 128:] = 7.0
    ours = nf4.dequantize_nf4(packed, qs, out=wide[:, :128])
    assert ours.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[:, :128], F.dequantize_4bit(packed, qs))
    assert torch.equal(wide[:, 128:], torch.full((5, 19), 7.0, dtype=torch.bfloat16, device=device))
    straddling_packed, straddling_qs = _quantize((4, 96), torch.bfloat16, device, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4.dequantize_nf4(straddling_packed, straddling_qs,
                           out=torch.empty(4, 100, dtype=torch.bfloat16, device=device)[:, :96])


def test_cpu_fallback_without_triton(monkeypatch):
    """On a CPU without the Triton interpreter the public functions fall back to the PyTorch reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    packed, qs = _quantize((50, 98), torch.bfloat16, "cpu", 64, nested=True)
    assert torch.equal(nf4.dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs))
    x = torch.randn(3, 98, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert torch.equal(nf4.nf4_matmul(x, packed, qs), nf4.matmul_reference(x, packed, qs))


def _matmul_case(M, N, K, dtype, device, blocksize=64, nested=False, quant_type="nf4", lead=()):
    packed, qs = _quantize((N, K), dtype, device, blocksize, nested, quant_type, seed=2)
    x = torch.randn(*lead, M, K, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    return x, packed, qs


def _assert_matmul_close(x, packed, qs, y):
    """Tolerance: the kernel multiplies the same W values (bit-exact dequant, rounded to x's dtype) and x
    as the reference, accumulating in fp32 in another order, then rounds once to x's dtype. So beyond
    the reference's own error it may differ by the fp32 summation error, at most K * 2^-24 * sum|x||w|
    (atol, with the largest row sum), and by one ulp of the output dtype (rtol) where the two fp32
    sums round to neighbouring values."""
    w = nf4.reference_torch(packed, qs, x.dtype)
    exact = x.double() @ w.double().T
    atol = x.shape[-1] * 2.0**-24 * float((x.double().abs() @ w.double().abs().T).max())
    assert_no_worse_than_reference(y, nf4.matmul_reference(x, packed, qs), exact, atol=atol, rtol=ULP[x.dtype],
                                   name="nf4_matmul")


# N not a multiple of BLOCK_N (32); K = 320 not a multiple of BLOCK_K (256: a masked last step);
# M = 16 fills one M tile, M = 17 needs two; split_k = 2 goes through the fp32 atomic workspace.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("M,N,K,blocksize,split_k", [(1, 48, 256, 64, 1), (5, 40, 320, 64, 2),
                                                     (16, 33, 512, 128, 1), (17, 40, 256, 64, 1)])
def test_nf4_matmul_forward(device, dtype, nested, M, N, K, blocksize, split_k):
    x, packed, qs = _matmul_case(M, N, K, dtype, device, blocksize, nested)
    y = nf4.nf4_matmul(x, packed, qs, split_k=split_k)
    assert y.dtype == dtype and y.shape == (M, N)
    _assert_matmul_close(x, packed, qs, y)


def test_nf4_matmul_big_block_fp4_and_batched_input(device):
    """blocksize 4096 > BLOCK_K (one scale across several K steps), fp4, x with leading dims."""
    x, packed, qs = _matmul_case(3, 8, 4096, torch.bfloat16, device, 4096, nested=True)
    _assert_matmul_close(x, packed, qs, nf4.nf4_matmul(x, packed, qs))
    x, packed, qs = _matmul_case(3, 24, 256, torch.float16, device, 64, quant_type="fp4", lead=(2,))
    y = nf4.nf4_matmul(x, packed, qs)
    assert y.shape == (2, 3, 24)
    _assert_matmul_close(x, packed, qs, y)


def test_nf4_matmul_unfused_fallback(device):
    """K odd: rows do not start on a byte, so the wrapper dequantizes and calls matmul: exactly the reference."""
    x, packed, qs = _matmul_case(4, 10, 63, torch.bfloat16, device)
    assert torch.equal(nf4.nf4_matmul(x, packed, qs), nf4.matmul_reference(x, packed, qs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_matmul_backward(device, dtype):
    """dx = dy @ W with a random upstream gradient. The kernel path dequantizes W bit-exactly and calls the
    same matmul as autograd on the reference, so no slack is needed (atol = rtol = 0)."""
    x, packed, qs = _matmul_case(5, 40, 256, dtype, device, 64, nested=True)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    dy = torch.randn(5, 40, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    nf4.nf4_matmul(x, packed, qs).backward(dy)
    nf4.matmul_reference(x_ref, packed, qs).backward(dy)
    exact = dy.double() @ nf4.reference_torch(packed, qs, dtype).double()
    assert_no_worse_than_reference(x.grad, x_ref.grad, exact, name="dx")


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_llama_shape_on_gpu(device, nested):
    """Llama-3.1-8B MLP weight (14336 x 4096, bf16): bit-exact dequant, and the fused matmul at decode sizes."""
    packed, qs = _quantize((14336, 4096), torch.bfloat16, device, 64, nested)
    _assert_bit_exact(packed, qs)
    for M in (1, 4, 16):
        x = torch.randn(M, 4096, device=device, dtype=torch.bfloat16)
        _assert_matmul_close(x, packed, qs, nf4.nf4_matmul(x, packed, qs))
