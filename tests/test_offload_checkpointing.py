"""Offloaded gradient checkpointing (use_gradient_checkpointing="unsloth") against no checkpointing and True.

CPU: same loss and every LoRA gradient as no checkpointing and as torch's checkpoint (tiny llama and gemma2,
4-bit and 16-bit, lora_dropout > 0, padded batch with attention_mask), LoRA in layer 0 trains when the layer input
does not require grad, each layer is recomputed exactly once, tuple outputs and keyword tensors work.
GPU: the same equality, lower peak memory than True, and overlapped copies equal to synchronized ones.
"""
import functools

import pytest
import torch
from torch import nn

from fastlm import FastLanguageModel
from fastlm.training.checkpointing import set_gradient_checkpointing
from fastlm.training.offload import OffloadedCheckpoint
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.fixtures.tiny_models import VOCAB

# fp32 on the CPU: checkpointing recomputes with the same ops on the same inputs, so results are bit-identical
# in practice; 1e-5 relative (of each gradient's largest entry) is the rule's bound. GPU: SDPA's backward and
# cuBLAS are not bitwise reproducible between runs; fp32 noise stays far below 1e-4.
CPU_RTOL, GPU_RTOL = 1e-5, 1e-4


def _lora_model(path, precision, dropout=0.1, peft=None, **load):
    """A tiny LoRA model (r=4) with random lora_B. load: from_pretrained options; peft: get_peft_model's."""
    flags = {"load_in_4bit": True} if precision == "4bit" else {"load_in_16bit": True}
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=64, use_gradient_checkpointing=False, **flags,
                                                 **load)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout,
                                             use_gradient_checkpointing=False, random_state=0, **(peft or {}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts lora_B at zero, which would leave every lora_A gradient zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _batch(device, seq=23, seed=2):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq - 6:] = 0  # right padding in the second row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=attention_mask,
                                                  labels=labels).items()}


def _loss_and_grads(model, mode, batch, seed=3):
    """One forward and backward under `mode` (None: leave the model's checkpointing as it is)."""
    if mode is not None:
        set_gradient_checkpointing(model, mode)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the LoRA dropout masks
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


def _layers(model):
    return model.get_base_model().model.layers


@pytest.mark.parametrize("precision", ["16bit", "4bit"])
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_same_loss_and_lora_gradients(tiny_checkpoint, model_type, precision):
    model = _lora_model(tiny_checkpoint(model_type), precision)
    batch = _batch(model.device)
    plain = _loss_and_grads(model, False, batch)
    torch_checkpoint = _loss_and_grads(model, True, batch)
    offloaded = _loss_and_grads(model, "unsloth", batch)
    assert isinstance(_layers(model)[0]._gradient_checkpointing_func, OffloadedCheckpoint)
    assert_same_loss_and_grads(plain, torch_checkpoint, CPU_RTOL, "True vs no checkpointing")
    assert_same_loss_and_grads(plain, offloaded, CPU_RTOL, "unsloth vs no checkpointing")
    # Dropout is on: another seed gives other gradients, so the equality above needed the RNG restored.
    other_seed = _loss_and_grads(model, "unsloth", batch, seed=4)
    assert not torch.equal(other_seed[0], offloaded[0])


def test_layer_input_without_grad_still_trains_lora(tiny_checkpoint):
    model = _lora_model(tiny_checkpoint("llama"), "16bit", dtype=torch.float32)  # bf16 on a GPU otherwise
    model.get_base_model().disable_input_require_grads()  # PEFT hooks the embeddings for 16-bit bases
    first_layer_input_grad = []
    _layers(model)[0].register_forward_pre_hook(lambda m, args: first_layer_input_grad.append(args[0].requires_grad))
    batch = _batch(model.device)
    plain = _loss_and_grads(model, False, batch)
    offloaded = _loss_and_grads(model, "unsloth", batch)
    # Layer 0 ran without and with offloading (transformers 5.17 also runs the pre-hook in the recomputation).
    assert len(first_layer_input_grad) >= 2 and not any(first_layer_input_grad)
    assert any(".layers.0." in n and "lora_A" in n for n in offloaded[1])
    rtol = CPU_RTOL if model.device.type == "cpu" else GPU_RTOL
    assert_same_loss_and_grads(plain, offloaded, rtol, "unsloth vs no checkpointing, frozen embeddings")


def test_each_layer_recomputed_once(tiny_checkpoint):
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    layers = _layers(model)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # a pre-hook: torch's checkpoint stops recomputing inside the MLP
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = _batch(model.device)
    for mode, runs_per_step in ((False, 1), (True, 2), ("unsloth", 2)):
        calls[:] = [0] * len(layers)
        for _ in range(2):
            _loss_and_grads(model, mode, batch)
        assert calls == [2 * runs_per_step] * len(layers), f"use_gradient_checkpointing={mode!r}"


class _TupleLayer(nn.Module):
    """A layer with trainable weights returning (hidden, None, aux); `scale` is a keyword tensor."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x, scale=None):
        hidden = self.dropout(self.linear(x)) * scale
        return hidden, None, hidden.sum(-1)


def _tuple_grads(layer, checkpoint, x, scale):
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    run = functools.partial(layer.forward, scale=scale)
    hidden, none, aux = checkpoint(run, x) if checkpoint else run(x)
    assert none is None
    (hidden.square().sum() + aux.sum()).backward()
    return [layer.linear.weight.grad, layer.linear.bias.grad] + [t.grad for t in (x, scale) if t.requires_grad]


@pytest.mark.parametrize("input_grad, scale_grad", [(True, False), (False, False), (False, True)])
def test_tuple_outputs_and_keyword_tensors(input_grad, scale_grad):
    torch.manual_seed(5)
    layer = _TupleLayer().train()
    x, scale = torch.randn(3, 5, 8), torch.rand(8) + 0.5
    results = []
    for checkpoint in (None, OffloadedCheckpoint()):
        xi, si = x.clone().requires_grad_(input_grad), scale.clone().requires_grad_(scale_grad)
        results.append(_tuple_grads(layer, checkpoint, xi, si))
    assert len(results[1]) == len(results[0]) == 2 + input_grad + scale_grad
    for plain, offloaded in zip(*results):
        torch.testing.assert_close(offloaded, plain, rtol=CPU_RTOL, atol=0)


class _InPlaceLayer(nn.Linear):
    def forward(self, x):
        return super().forward(x.mul_(2))


def test_second_backward_and_in_place_input_give_clear_errors():
    layer = nn.Linear(4, 4)
    out = OffloadedCheckpoint()(layer.forward, torch.randn(2, 4)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()
    with pytest.raises(RuntimeError, match="in place"):
        OffloadedCheckpoint()(_InPlaceLayer(4, 4).forward, torch.randn(2, 4))


def test_plain_transformers_model_is_untouched(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    set_gradient_checkpointing(_lora_model(tiny_checkpoint("llama"), "16bit"), "unsloth")
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    layer = plain.model.layers[0]
    assert not layer.gradient_checkpointing
    plain.gradient_checkpointing_enable()
    assert not isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint)


def test_trainer_requests_keep_the_offloaded_checkpoint(tiny_checkpoint):
    """What transformers' Trainer does with gradient_checkpointing=True (enable with torch's checkpoint) keeps
    "unsloth"'s OffloadedCheckpoint, after a disable too; other arguments (every_n_layers) pass through; setting
    True through fastlm makes such requests transformers' own again."""
    import inspect

    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    base = model.get_base_model()
    set_gradient_checkpointing(model, "unsloth")
    layers = base.model.layers
    offloaded = layers[0]._gradient_checkpointing_func
    assert isinstance(offloaded, OffloadedCheckpoint)
    base.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert all(layer.gradient_checkpointing and layer._gradient_checkpointing_func is offloaded for layer in layers)
    if "every_n_layers" in inspect.signature(type(base)._set_gradient_checkpointing).parameters:  # 5.24, not 5.17
        base.gradient_checkpointing_enable(every_n_layers=2)
        assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
        assert all(layer._gradient_checkpointing_func is offloaded for layer in layers)
    set_gradient_checkpointing(model, True)
    base.gradient_checkpointing_enable()
    assert not isinstance(layers[0]._gradient_checkpointing_func, OffloadedCheckpoint)


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_gpu_same_loss_and_lora_gradients(tiny_checkpoint, model_type):
    model = _lora_model(tiny_checkpoint(model_type), "16bit", dtype=torch.float32)
    assert model.device.type == "cuda"
    batch = _batch(model.device)
    plain = _loss_and_grads(model, False, batch)
    assert_same_loss_and_grads(plain, _loss_and_grads(model, True, batch), GPU_RTOL, "True vs no checkpointing")
    assert_same_loss_and_grads(plain, _loss_and_grads(model, "unsloth", batch), GPU_RTOL, "unsloth vs no checkpointing")


LAYERS, HIDDEN, SEQ, BATCH = 8, 1024, 2048, 2


def _gpu_lora_model(dtype):
    """8 layers, hidden 1024, seeded random weights built on the GPU, LoRA r=8 on every projection."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2816, num_hidden_layers=LAYERS,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=4096,
                         max_position_embeddings=SEQ, use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(dtype)
    base.requires_grad_(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def _gpu_batch():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 4096, (BATCH, SEQ), generator=generator).cuda()
    return dict(input_ids=ids, labels=ids)


@pytest.mark.gpu
def test_gpu_offloaded_peak_memory_is_lower():
    model = _gpu_lora_model(torch.bfloat16)
    batch = _gpu_batch()
    held, peaks = {}, {}
    for mode in (True, "unsloth", True, "unsloth"):  # the second round is measured, after warm-up
        _loss_and_grads(model, mode, batch)
        set_gradient_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = model(**batch).loss
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before  # what forward leaves for backward
        forward_peak = torch.cuda.max_memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - before
        print(f"offload-memory {mode}: held after forward {held[mode] / 2**20:.0f} MiB, forward peak "
              f"{forward_peak / 2**20:.0f} MiB, step peak {peaks[mode] / 2**20:.0f} MiB")
    input_bytes = BATCH * SEQ * HIDDEN * 2
    # True keeps every layer's input on the GPU until backward; offloading keeps only the last layer's (its
    # backward comes first) once the copies are done (the H200, run 56: 48 MiB less held, 6 inputs of 8).
    assert held[True] - held["unsloth"] >= (LAYERS - 2) * input_bytes
    # The step's peak is in backward, where True still holds the inputs of the layers not yet reached and
    # offloading holds its own and the prefetched one, plus (run 7) about one more whose memory the caching
    # allocator hands back only once the side stream's copy has finished: 29 MiB lower of 8 x 8 MiB.
    assert peaks[True] - peaks["unsloth"] >= (LAYERS - 5) * input_bytes


def _train(model, mode, steps, synchronize):
    set_gradient_checkpointing(model, mode)
    if mode == "unsloth":
        checkpoint = _layers(model)[0]._gradient_checkpointing_func
        assert isinstance(checkpoint, OffloadedCheckpoint)
        checkpoint.synchronize = synchronize
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(steps):
        loss, _ = _loss_and_grads(model, None, _gpu_batch(), seed=step)
        optimizer.step()
        losses.append(loss.float())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), lora


@pytest.mark.gpu
def test_gpu_overlapped_copies_equal_synchronized_ones():
    """A copy racing a free or a reuse would read garbage: overlapped steps must equal fully synchronized ones."""
    runs = {}
    for name, mode, synchronize in (("sync", "unsloth", True), ("async", "unsloth", False), ("torch", True, False)):
        runs[name] = _train(_gpu_lora_model(torch.float32), mode, steps=4, synchronize=synchronize)
    for name in ("async", "torch"):
        torch.testing.assert_close(runs[name][0], runs["sync"][0], rtol=GPU_RTOL, atol=0)
        for key, weight in runs["sync"][1].items():
            scale = weight.abs().max().item()
            error = (runs[name][1][key] - weight).abs().max().item()
            assert error <= GPU_RTOL * scale, f"{name}: {key} differs by {error:.3g} (largest {scale:.3g})"


class _Event:
    """Stands in for a torch.cuda.Event on the CPU: records when the throttle waited for it."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append(self.name)


def test_copy_throttle_waits_for_the_oldest_copies():
    from fastlm.training.offload import MAX_COPIES_IN_FLIGHT, _CopyThrottle

    throttle, waited = _CopyThrottle(), []
    for i in range(MAX_COPIES_IN_FLIGHT + 3):
        throttle.wait_for_room()
        throttle.add(_Event(waited, i))
        assert len(throttle.pending) <= MAX_COPIES_IN_FLIGHT
    assert waited == [0, 1, 2]  # oldest first, one per copy beyond the bound


@pytest.mark.gpu
def test_gpu_host_waits_when_copies_fall_behind():
    """A host far ahead of the GPU (CUDA-graphed layers) must not leave more than MAX_COPIES_IN_FLIGHT offload
    copies unfinished: each pending copy keeps its layer input allocated."""
    from fastlm.training.offload import MAX_COPIES_IN_FLIGHT

    checkpoint = OffloadedCheckpoint()
    a, b = torch.randn(4096, 4096, device="cuda"), torch.randn(4096, 4096, device="cuda")
    out = torch.empty_like(a)
    inputs = [torch.randn(1024, 1024, device="cuda") for _ in range(8)]
    torch.cuda.synchronize()
    events, entries = [], []
    for x in inputs:
        for _ in range(20):  # ~3 ms of GPU work per "layer", ~0.2 ms of host time: the host runs ahead
            torch.matmul(a, b, out=out)
        entries.append(checkpoint.save(x))  # the copy waits for the compute stream's work queued so far
        events.append(checkpoint._throttle.pending[-1])
    finished = sum(event.query() for event in events)
    assert finished >= len(inputs) - MAX_COPIES_IN_FLIGHT
    torch.cuda.synchronize()
    for entry, x in zip(entries, inputs):
        torch.testing.assert_close(entry.host, [x.cpu()], rtol=0, atol=0)
