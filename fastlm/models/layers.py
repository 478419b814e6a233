"""Norm and MLP forwards on fastlm kernels, bound to transformers' own module instances.

Each function here becomes an instance's `forward` (types.MethodType + functools.partial for its settings):
the module keeps its Parameters, names and state_dict, so PEFT (modules_to_save deep-copies a module and
rebinds the method to the copy), saving and loading see the unchanged module.

Before a class of module is patched, `matches_reference` runs the class's own forward and ours on the same
random input: a transformers version whose semantics moved (a different eps attribute, another norm
convention, another activation) is left unpatched instead of silently computing something else.
"""
import torch
import torch.nn.functional as F

from fastlm.kernels.geglu import geglu
from fastlm.kernels.layer_norm import layer_norm
from fastlm.kernels.rms_norm import rms_norm
from fastlm.kernels.swiglu import swiglu

# Relative error allowed between a class's own forward and ours on the fp32 probe (reference math, no Triton):
# both are fp32 formulas of the same definition; 1e-5 leaves room for reassociated sums, while a wrong
# convention (w vs 1 + w, another eps, gelu vs silu) is off by 1e-3 or more.
PROBE_RTOL = 1e-5


def norm_eps(module) -> float:
    """The epsilon of a transformers norm: `variance_epsilon` (Llama family), `eps` (Gemma, nn.LayerNorm)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(f"{type(module).__name__} has no variance_epsilon / eps attribute")


def rms_norm_forward(self, hidden_states: torch.Tensor, *, gemma_style: bool) -> torch.Tensor:
    """RMSNorm of hidden_states (..., N) with self.weight (N,): Llama `w * x_hat` or Gemma `(1 + w) * x_hat`.

    Output dtype as transformers': promote(x, w) (Llama) or x's dtype (Gemma)."""
    return rms_norm(hidden_states, self.weight, norm_eps(self), gemma_style)


def layer_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm over the last dimension (..., N) with the module's weight and bias (either may be None)."""
    return layer_norm(hidden_states, self.weight, self.bias, norm_eps(self))


def mlp_forward(self, hidden_states: torch.Tensor, *, activation: str, fused_gate_up: bool) -> torch.Tensor:
    """down_proj(act(gate) * up) with the activation and product fused (fastlm.kernels.swiglu / geglu).

    Args:
        hidden_states: (B, T, H).
        activation: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU).
        fused_gate_up: Phi-3's gate_up_proj, whose output (B, T, 2I) is split into gate and up views.
    Returns:
        (B, T, H). gate_proj runs before up_proj, as in transformers (same RNG order for LoRA dropout).
    """
    if fused_gate_up:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)  # two (B, T, I) views
    else:
        gate = self.gate_proj(hidden_states)
        up = self.up_proj(hidden_states)
    if activation == "silu":
        fused = swiglu(gate, up)
    else:
        fused = geglu(gate, up, approximate="tanh" if activation == "gelu_tanh" else "none")
    return self.down_proj(fused)


def activation_of(activation_module) -> str:
    """"silu", "gelu_tanh" or "gelu" when the module computes that function (probed), else "unknown"."""
    probe = torch.linspace(-8.0, 8.0, 401, dtype=torch.float32)
    with torch.no_grad():
        got = activation_module(probe)
        candidates = {"silu": F.silu(probe), "gelu_tanh": F.gelu(probe, approximate="tanh"), "gelu": F.gelu(probe)}
    for name, expected in candidates.items():
        if torch.allclose(got, expected, rtol=PROBE_RTOL, atol=1e-7):
            return name
    return "unknown"


def norm_matches(module, ours) -> bool:
    """True when the module's class forward and `ours(module, x)` agree on a random fp32 probe (2, 3, N)."""
    weight = module.weight
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[-1], generator=generator, dtype=torch.float32).to(weight.device)
    probe = probe.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else probe
    with torch.no_grad():
        expected = type(module).forward(module, probe).double()
        got = ours(module, probe).double()
    slack = 1e-2 if probe.dtype != torch.float32 else PROBE_RTOL  # 16-bit weights: a rounding, not a convention
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=slack, atol=slack)
