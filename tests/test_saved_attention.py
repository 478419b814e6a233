"""Attention's output kept for the checkpointed layer's recomputation (fastlm/models/saved_attention.py).

Unit: the reused node's output and q/k/v gradients equal SDPA's own (causal, grouped-query heads, odd length), in
fp32 and bf16, through the same memo the offloaded checkpoint uses. Model: under use_gradient_checkpointing=
"unsloth" every tiny architecture that reaches SDPA without a mask gives the loss and LoRA gradients of no
checkpointing, and its backward runs no attention forward (counted at the aten level); a batch with a mask or
the switch off recompute as before. GPU: the same with the CUDA graphs, bf16.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm.kernels.lora import restore_saved, reuse_casts, take_saved
from fastlm.models import saved_attention
from fastlm.patching import SWITCH
from fastlm.training.checkpointing import set_gradient_checkpointing
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.test_offload_checkpointing import _lora_model

# fp32 on the CPU: the reused node's backward is the very op SDPA's autograd calls, on bit-identical inputs; the
# rule's 1e-5 relative bound. GPU bf16: the same cuDNN kernels as the recomputing path, which is not bitwise
# reproducible between runs (its backward's atomics), so PyTorch's bf16 error at these sizes (2^-8 relative).
CPU_RTOL, GPU_BF16_RTOL = 1e-5, 4e-3

ATTENTION_FORWARDS = ("_scaled_dot_product_flash_attention_for_cpu.default",
                      "_scaled_dot_product_cudnn_attention.default",
                      "_scaled_dot_product_flash_attention.default",
                      "_scaled_dot_product_efficient_attention.default")


class _CountAttentionForwards(TorchDispatchMode):
    """Counts the attention kernels' forward calls (any SDPA backend) run inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).removeprefix("aten.") in ATTENTION_FORWARDS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


class _Module:
    """What saved_attention reads from an attention module."""
    is_causal = True

    def __init__(self):
        self.config = type("Config", (), {"_attn_implementation": "sdpa"})()


def _qkv(dtype, batch=2, heads=4, kv_heads=2, length=37, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    return q, k, v


def _sdpa_grads(q, k, v, grad, scale, dtype):
    """(output, [dq, dk, dv]) of SDPA's own causal grouped-query attention in `dtype`."""
    inputs = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    output = F.scaled_dot_product_attention(*inputs, is_causal=True, scale=scale, enable_gqa=True)
    output.backward(grad.to(dtype))
    return output.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_attention_equals_sdpa(dtype):
    q, k, v = _qkv(dtype)
    scale = 0.3
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, expected_grads = _sdpa_grads(q, k, v, grad, scale, dtype)

    module, memo = _Module(), {}
    with torch.no_grad(), reuse_casts(memo):  # the checkpoint's forward pass
        first = saved_attention.saved_attention(module, q, k, v, None, 0.0, scale, None, {})
    kept = take_saved(memo)
    assert first is not None and len(kept) == 2  # the output and its log-sum-exp
    restore_saved(memo, kept)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with _CountAttentionForwards() as counter, reuse_casts(memo, recomputing=True):
        again = saved_attention.saved_attention(module, *inputs, None, 0.0, scale, None, {})
        again.backward(grad.transpose(1, 2))
    assert counter.calls == 0, "the recomputation ran the attention forward again"
    # (B, T, nh, hd) as transformers' attention functions return it; bit-identical: the same kernel and inputs
    torch.testing.assert_close(first, expected.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(again, expected.transpose(1, 2), rtol=0, atol=0)
    grads = [t.grad for t in inputs]
    if dtype == torch.float32:  # SDPA sums the grouped heads' dk/dv in another order: the rule's 1e-5 relative
        for mine, theirs, name in zip(grads, expected_grads, ("dq", "dk", "dv")):
            error, largest = (mine - theirs).abs().max().item(), theirs.abs().max().item()
            assert 0 < largest and error <= CPU_RTOL * largest, f"{name}: {error:.3g} against largest {largest:.3g}"
        return
    # bf16: both round their gradients (~1 ulp apart at the largest entries), so each is measured against fp64.
    # Measured over 4 draws: the error norm ratio (ours / SDPA's) 0.91-1.07; a wrong term is off by ~100x.
    _, exact = _sdpa_grads(q, k, v, grad, scale, torch.float64)
    for mine, theirs, truth, name in zip(grads, expected_grads, exact, ("dq", "dk", "dv")):
        ours, pytorch = (mine.double() - truth).norm().item(), (theirs.double() - truth).norm().item()
        assert ours <= 1.1 * pytorch, f"{name}: error norm {ours:.3g} against SDPA's {pytorch:.3g}"


def test_not_covered_cases_return_none():
    q, k, v = _qkv(torch.float32)
    module, memo = _Module(), {}
    mask = torch.ones(2, 1, 37, 37, dtype=torch.bool)
    with torch.no_grad(), reuse_casts(memo):
        assert saved_attention.saved_attention(module, q, k, v, mask, 0.0, 0.3, None, {}) is None
        assert saved_attention.saved_attention(module, q, k, v, None, 0.1, 0.3, None, {}) is None
        assert saved_attention.saved_attention(module, q, k, v, None, 0.0, 0.3, None, {"softcap": 50.0}) is None
        assert saved_attention.saved_attention(module, q, k, v, None, 0.0, 0.3, None, {"is_causal": False}) is None
        assert saved_attention.saved_attention(module, q[:, :, :1], k[:, :, :1], v[:, :, :1], None, 0.0, 0.3,
                                               None, {}) is None
    with torch.no_grad():  # outside the offloaded checkpoint's memo
        assert saved_attention.saved_attention(module, q, k, v, None, 0.0, 0.3, None, {}) is None
    assert take_saved(memo) == []


def _unpadded_batch(device, seq=29, seed=2):
    from tests.fixtures.tiny_models import VOCAB
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, seq), generator=generator).to(device)
    return dict(input_ids=input_ids, labels=input_ids.clone())


def _counted_step(model, mode, batch):
    """(loss, grads, attention forwards run by backward) of one step under checkpointing `mode` (None: as set)."""
    if mode is not None:
        set_gradient_checkpointing(model, mode)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    with _CountAttentionForwards() as counter:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 on the CPU; on a GPU fp32 is not cuDNN's: "
                    "test_gpu_graphed_layers_reuse_attention covers the GPU in bf16")
@pytest.mark.parametrize("model_type, precision", [("llama", "16bit"), ("qwen3", "4bit"), ("phi3", "16bit"),
                                                  ("gemma", "4bit")])
def test_unsloth_checkpointing_reuses_attention(tiny_checkpoint, model_type, precision, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")  # the fast path (fastlm's attention forward) on the CPU too
    model = _lora_model(tiny_checkpoint(model_type), precision, dropout=0.0, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    layers = model.get_base_model().model.layers
    batch = _unpadded_batch(model.device)
    loss, grads, forwards = _counted_step(model, False, batch)
    assert forwards == 0
    reused = _counted_step(model, "unsloth", batch)
    assert reused[2] == 0, "the recomputation ran attention forwards"
    assert_same_loss_and_grads((loss, grads), reused[:2], CPU_RTOL, "reused attention vs no checkpointing")
    monkeypatch.setattr(saved_attention, "ENABLED", False)
    recomputed = _counted_step(model, "unsloth", batch)
    assert recomputed[2] == len(layers)  # the check above can fail: without the saved output each layer recomputes
    assert_same_loss_and_grads((loss, grads), recomputed[:2], CPU_RTOL, "recomputed attention vs no checkpointing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 on the CPU (see above)")
def test_recomputation_without_a_saved_output_computes_it(tiny_checkpoint, monkeypatch):
    """A recomputation that finds nothing saved for its call (here: the switch turned on between forward and
    backward; on a GPU: a graphed layer run twice before one backward) computes the attention itself, same result."""
    monkeypatch.setenv(SWITCH, "1")
    model = _lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.0, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    batch = _unpadded_batch(model.device)
    expected = _counted_step(model, False, batch)
    set_gradient_checkpointing(model, "unsloth")
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(saved_attention, "ENABLED", False)
    loss = model(**batch).loss
    monkeypatch.setattr(saved_attention, "ENABLED", True)
    with _CountAttentionForwards() as counter:
        loss.backward()
    assert counter.calls == len(model.get_base_model().model.layers)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same_loss_and_grads(expected[:2], (loss.detach(), grads), CPU_RTOL, "nothing saved vs no checkpointing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 on the CPU (see above)")
def test_padded_batch(tiny_checkpoint, monkeypatch):
    """Right padding without labels runs without its mask (fastlm.models.causal_lm.padding_mask_droppable), so the
    saved output serves it; a batch that keeps its mask (here: that drop turned off) recomputes the attention."""
    from fastlm.models import causal_lm
    from tests.test_offload_checkpointing import _batch
    monkeypatch.setenv(SWITCH, "1")
    model = _lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.0, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    layers = len(model.get_base_model().model.layers)
    batch = _batch(model.device)  # right padding, labels -100 there
    expected = _counted_step(model, False, batch)
    padded = _counted_step(model, "unsloth", batch)
    assert padded[2] == 0
    assert_same_loss_and_grads(expected[:2], padded[:2], CPU_RTOL, "padded batch, unsloth vs no checkpointing")
    monkeypatch.setattr(causal_lm, "DROP_PADDING_MASK", False)
    masked = _counted_step(model, "unsloth", batch)
    assert masked[2] == layers  # transformers passes the mask: not the saved path
    assert_same_loss_and_grads(expected[:2], masked[:2], CPU_RTOL, "masked batch, unsloth vs no checkpointing")


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_gpu_graphed_layers_reuse_attention(tiny_checkpoint, model_type, monkeypatch):
    """bf16 on the GPU: the first step runs eagerly (its backward runs no attention forward: cuDNN's path is taken),
    the next ones capture and replay the layers' CUDA graphs with the saved tensors in their static buffers; every
    step's loss and gradients equal those of a model whose recomputation runs the attention again."""
    from fastlm.training.checkpointing import checkpointing_module

    def four_steps(enabled: bool):
        monkeypatch.setattr(saved_attention, "ENABLED", enabled)
        model = _lora_model(tiny_checkpoint(model_type), "16bit", dropout=0.0, dtype=torch.bfloat16)
        model.config._attn_implementation = "sdpa"
        set_gradient_checkpointing(model, "unsloth")
        batch = _unpadded_batch(model.device, seq=256)  # a length bucket: captured at its second call
        steps = [_counted_step(model, None, batch) for _ in range(4)]
        assert checkpointing_module(model)[1].graphs.captured() == len(model.get_base_model().model.layers)
        return steps

    reused, recomputed = four_steps(True), four_steps(False)
    assert reused[0][2] == 0 and recomputed[0][2] > 0
    for step, (mine, theirs) in enumerate(zip(reused, recomputed)):
        assert_same_loss_and_grads(theirs[:2], mine[:2], GPU_BF16_RTOL, f"step {step}: reused vs recomputed")


@pytest.mark.gpu
def test_gpu_two_forwards_before_one_backward(tiny_checkpoint, monkeypatch):
    """Two calls before one backward under the CUDA graphs: the second call's forward replays over the first's, so
    the first call's layers recompute eagerly with nothing saved in their memo (see saved_attention's fallback);
    loss and gradients equal those of a model whose recomputation always runs the attention again."""
    def two_calls(enabled: bool):
        monkeypatch.setattr(saved_attention, "ENABLED", enabled)
        model = _lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.0, dtype=torch.bfloat16)
        model.config._attn_implementation = "sdpa"
        set_gradient_checkpointing(model, "unsloth")
        model.train()
        first, second = _unpadded_batch(model.device, seq=256, seed=5), _unpadded_batch(model.device, seq=256, seed=6)
        for _ in range(3):  # the first call of each layer runs eagerly, the second captures, the third replays
            model.zero_grad(set_to_none=True)
            loss = model(**first).loss + 0.5 * model(**second).loss
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    assert_same_loss_and_grads(two_calls(False), two_calls(True), GPU_BF16_RTOL, "two forwards, one backward")
