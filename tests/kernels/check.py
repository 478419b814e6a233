"""The tolerance rule of every kernel test (DESIGN.md section 4).

A kernel output is accepted when, elementwise, it is no further from the exact result (fp64 or
fp32 math on upcast inputs) than PyTorch's own reference run at the working dtype, plus `atol`:

    |exact - kernel| <= |exact - reference_at_dtype| + atol + rtol * |exact|

Each test names its atol/rtol and says in a comment why that slack is needed (usually: one ulp of
the output dtype, since the Triton interpreter truncates fp32 -> bf16 instead of rounding).
"""
import torch

# One unit in the last place, relative, of each dtype: bf16 has 8 bits of mantissa, fp16 11, fp32 24.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


def assert_no_worse_than_reference(kernel_out: torch.Tensor, reference_out: torch.Tensor,
                                   exact: torch.Tensor, atol: float = 0.0, rtol: float = 0.0,
                                   name: str = "output") -> None:
    """Fail with the worst offending element when the kernel is further from `exact` than the reference."""
    assert kernel_out.shape == exact.shape, f"{name}: shape {tuple(kernel_out.shape)} != {tuple(exact.shape)}"
    exact = exact.double()
    kernel_err = (kernel_out.double() - exact).abs()
    reference_err = (reference_out.double() - exact).abs()
    allowed = reference_err + atol + rtol * exact.abs()
    assert torch.isfinite(kernel_out).all(), f"{name}: kernel produced NaN/inf"
    excess = kernel_err - allowed
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{name}: kernel error {kernel_err.flatten()[worst]:.3g} exceeds reference error "
        f"{reference_err.flatten()[worst]:.3g} + tolerance at flat index {worst} "
        f"(exact {exact.flatten()[worst]:.6g}, kernel {kernel_out.flatten()[worst].item():.6g})")
