"""q/k/v's outputs kept from a checkpointed layer's forward for its recomputation (lora_projections' keep_outputs,
fastlm.training.fused_lora.KEEP_QKV).

Unit: through the memo the offloaded checkpoint uses, the forward pass saves the outputs, the recomputation returns
them bit-identical without a matrix product, and its gradients equal those of a node that computed its outputs;
nothing saved (or saved with other shapes) means computed. Model: under use_gradient_checkpointing="unsloth" each
tiny architecture's loss and LoRA gradients equal no checkpointing, and the backward runs fewer matrix products
than with the switch off (q/k/v's, one group per layer). GPU: the same with the CUDA graphs, bf16.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm.kernels.lora import DenseWeight, LoRA, SAVED_FOR_RECOMPUTATION, lora_projections, restore_saved, \
    reuse_casts, take_saved
from fastlm.patching import SWITCH
from fastlm.training import fused_lora
from fastlm.training.checkpointing import set_gradient_checkpointing
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.test_offload_checkpointing import _lora_model
from tests.test_saved_attention import _unpadded_batch

# fp32 on the CPU: the kept outputs are the forward's own tensors and the backward the same ops on the same inputs,
# so results are bit-identical in practice; the rule's 1e-5 relative bound. GPU bf16: cuDNN's attention backward is
# not bitwise reproducible between runs (atomics), so PyTorch's bf16 error at these sizes (2^-8 relative).
CPU_RTOL, GPU_BF16_RTOL = 1e-5, 4e-3

MATRIX_PRODUCTS = ("mm.default", "addmm.default", "addmm_.default", "mm.out", "addmm.out", "bmm.default",
                   "matmul.default", "linear.default")


class _CountMatrixProducts(TorchDispatchMode):
    """Counts the matrix-product ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).removeprefix("aten.") in MATRIX_PRODUCTS:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _group(dtype, seed=0):
    """x (2, 7, 24) and q/k/v-like bases (24 / 8 / 8 outputs) with LoRAs of rank 3 (k without one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 24, generator=g).to(dtype)
    bases = [DenseWeight(torch.randn(n, 24, generator=g).to(dtype)) for n in (24, 8, 8)]
    loras = [LoRA(torch.randn(3, 24, generator=g).to(dtype).requires_grad_(),
                  torch.randn(n, 3, generator=g).to(dtype).requires_grad_(), 0.5) if n else None
             for n in (24, 0, 8)]
    return x, bases, loras


def _grads(outputs, x, loras, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(y.shape, generator=g).to(y.dtype) for y in outputs]
    torch.autograd.backward(list(outputs), weights)
    return [x.grad] + [t.grad for lora in loras if lora is not None for t in (lora.A, lora.B)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputation_takes_the_kept_outputs(dtype):
    x, bases, loras = _group(dtype)
    computed_x = x.clone().requires_grad_()
    computed = lora_projections(computed_x, bases, loras)
    expected_grads = _grads(computed, computed_x, loras)
    for lora in loras:
        if lora is not None:
            lora.A.grad = lora.B.grad = None

    memo = {}
    with torch.no_grad(), reuse_casts(memo):  # the checkpoint's forward pass
        first = lora_projections(x, bases, loras, keep_outputs=True)
    kept = take_saved(memo)
    assert len(kept) == 3 and all(a is b for a, b in zip(kept, first))
    restore_saved(memo, kept)
    recomputed_x = x.clone().requires_grad_()
    with _CountMatrixProducts() as counter, reuse_casts(memo, recomputing=True):
        again = lora_projections(recomputed_x, bases, loras, keep_outputs=True)
    assert counter.calls == 0, "the recomputation ran matrix products"
    for mine, theirs in zip(again, computed):  # the same tensors the forward made: bit-identical
        torch.testing.assert_close(mine, theirs.detach(), rtol=0, atol=0)
    for mine, theirs in zip(_grads(again, recomputed_x, loras), expected_grads):  # the same ops on the same inputs
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_nothing_kept_or_other_shapes_compute():
    x, bases, loras = _group(torch.float32)
    memo = {}
    with torch.no_grad(), reuse_casts(memo):
        lora_projections(x, bases, loras)  # keep_outputs off: nothing saved
        assert memo.get(SAVED_FOR_RECOMPUTATION, []) == []
        lora_projections(x, bases, loras, keep_outputs=True)
    with torch.no_grad():  # outside any checkpoint memo: nothing to keep into
        lora_projections(x, bases, loras, keep_outputs=True)
    kept = take_saved(memo)
    restore_saved(memo, [t[:, :5] for t in kept])  # another length than the recomputation's input
    with _CountMatrixProducts() as counter, reuse_casts(memo, recomputing=True):
        lora_projections(x.clone().requires_grad_(), bases, loras, keep_outputs=True)
    assert counter.calls > 0, "outputs of other shapes were taken"
    with _CountMatrixProducts() as counter, reuse_casts({}, recomputing=True):
        lora_projections(x.clone().requires_grad_(), bases, loras, keep_outputs=True)
    assert counter.calls > 0


def _counted_step(model, batch, keep: bool, monkeypatch):
    """(loss, grads, matrix products run by backward) of one step; KEEP_QKV set to `keep` for it."""
    monkeypatch.setattr(fused_lora, "KEEP_QKV", keep)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    with _CountMatrixProducts() as counter:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 on the CPU; test_gpu_graphed_layers_keep_qkv covers "
                    "the GPU in bf16")
@pytest.mark.parametrize("model_type, precision", [("llama", "16bit"), ("qwen3", "4bit"), ("phi3", "16bit"),
                                                  ("gemma2", "4bit")])
def test_unsloth_checkpointing_keeps_qkv(tiny_checkpoint, model_type, precision, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")  # the fast path (fastlm's attention and fused LoRA) on the CPU too
    model = _lora_model(tiny_checkpoint(model_type), precision, dropout=0.0, dtype=torch.float32)
    batch = _unpadded_batch(model.device)
    set_gradient_checkpointing(model, False)
    plain = _counted_step(model, batch, True, monkeypatch)
    set_gradient_checkpointing(model, "unsloth")
    kept = _counted_step(model, batch, True, monkeypatch)
    recomputed = _counted_step(model, batch, False, monkeypatch)
    assert_same_loss_and_grads(plain[:2], kept[:2], CPU_RTOL, "kept q/k/v vs no checkpointing")
    assert_same_loss_and_grads(plain[:2], recomputed[:2], CPU_RTOL, "recomputed q/k/v vs no checkpointing")
    layers = len(model.get_base_model().model.layers)
    # Each layer's recomputation skips at least one matrix product (q/k/v's base GEMMs and LoRA terms)
    assert recomputed[2] - kept[2] >= layers, (kept[2], recomputed[2])


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_gpu_graphed_layers_keep_qkv(tiny_checkpoint, model_type, monkeypatch):
    """bf16 on the GPU: the first step runs eagerly, the next ones capture and replay the layers' CUDA graphs with
    the kept outputs in their static buffers; every step's loss and gradients equal those of a model whose
    recomputation runs q/k/v's projections again."""
    from fastlm.training.checkpointing import checkpointing_module

    def four_steps(keep: bool):
        model = _lora_model(tiny_checkpoint(model_type), "16bit", dropout=0.0, dtype=torch.bfloat16)
        model.config._attn_implementation = "sdpa"
        set_gradient_checkpointing(model, "unsloth")
        batch = _unpadded_batch(model.device, seq=256)  # a length bucket: captured at its first call after warm-up
        steps = [_counted_step(model, batch, keep, monkeypatch) for _ in range(4)]
        assert checkpointing_module(model)[1].graphs.captured() == len(model.get_base_model().model.layers)
        return steps

    kept, recomputed = four_steps(True), four_steps(False)
    assert kept[0][2] < recomputed[0][2]  # the eager first step: fewer products in backward
    for step, (mine, theirs) in enumerate(zip(kept, recomputed)):
        assert_same_loss_and_grads(theirs[:2], mine[:2], GPU_BF16_RTOL, f"step {step}: kept vs recomputed")
