"""CUDA graphs of checkpointed decoder layers (fastlm/training/layer_graphs.py).

CPU: how a layer call is described and rebuilt with static tensors, what invalidates a graph (adapter state,
replaced or unfrozen parameters, autocast), which layers are refused (dropout), the switch.
GPU: training with graphs equals training without them, step by step, for each family and 4/16-bit; an adapter
disabled, a new sequence length, and one layer run twice before a backward each give the eager result; captures
succeed beside DataLoader workers and their pin-memory thread.
"""
import collections
import gc
import weakref

import pytest
import torch

from fastlm.training.checkpointing import set_gradient_checkpointing
from fastlm.training.layer_graphs import (SEEN_SIGNATURES_KEPT, NotGraphable, LayerGraphs, _describe, _LayerEntry,
                                          _SharedBuffer, dropout_reason, _layer_state, _outputs_recorded,
                                          _substitute, graphs_enabled)
from fastlm.training.offload import OffloadedCheckpoint
from tests import test_offload_checkpointing as offload_tests
from tests.test_offload_checkpointing import _batch, _layers

# fp32 on the GPU: a replay runs the same kernels as the eager call on the same inputs; what may differ is only
# the order of SDPA's and cuBLAS's own reductions between runs, fp32 noise far below 1e-4 (as in
# tests/test_offload_checkpointing.py).
GPU_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _math_attention_on_gpu():
    """The GPU comparisons here run SDPA's math kernel. fp32 SDPA otherwise takes the memory-efficient kernel, whose
    results under a graph replay differ slightly from the eager call's (bench/RESULTS.md run 98, gemma2 16-bit, 4
    AdamW steps at lr 1e-2, which magnify gradient noise: graphs vs eager 1.6e-4 of a weight's largest entry with
    that kernel, 2.5e-6 with math; eager vs eager 0 with either). What is checked here is fastlm's capture and
    replay, not that kernel; bf16 training under graphs with cuDNN's attention: tests/test_saved_attention.py."""
    if not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _lora_model(path, precision, dropout=0.0):
    """fp32 weights (the GPU comparisons' tolerance), LoRA r=4 with random B, offloaded checkpointing."""
    model = offload_tests._lora_model(path, precision, dropout=dropout, dtype=torch.float32)
    set_gradient_checkpointing(model, "unsloth")
    return model


# ---------------------------------------------------------------- CPU

def test_describe_and_substitute_round_trip():
    Pair = collections.namedtuple("Pair", "cos sin")
    a, b, c = torch.zeros(2, 3), torch.ones(4, dtype=torch.long), torch.zeros(1)
    value = ((a, None), {"mask": b, "pos": Pair(c, a), "flag": True, "n": 3})
    tensors = []
    description = _describe(value, tensors)
    assert len(tensors) == 4 and all(x is y for x, y in zip(tensors, [a, b, c, a]))
    hash(description)
    # Same shapes, other tensors: the same description; another shape or another flag: a different one.
    def described(first, flag=True):
        return _describe(((first, None), {"mask": b, "pos": Pair(c, a), "flag": flag, "n": 3}), [])
    assert described(torch.ones(2, 3)) == description
    assert described(torch.ones(2, 4)) != description
    assert described(a, flag=False) != description
    replacements = [torch.full_like(t, 7) for t in tensors]
    rebuilt = _substitute(value, iter(replacements))
    assert rebuilt[0][0] is replacements[0] and rebuilt[0][1] is None
    assert rebuilt[1]["mask"] is replacements[1] and isinstance(rebuilt[1]["pos"], Pair)
    assert rebuilt[1]["pos"].cos is replacements[2] and rebuilt[1]["pos"].sin is replacements[3]
    assert rebuilt[1]["flag"] is True and rebuilt[1]["n"] == 3
    with pytest.raises(NotGraphable, match="object"):
        _describe((object(),), [])


def test_layer_state_sees_what_changes_the_forward_path(tiny_checkpoint):
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    layer = _layers(model)[0]
    start = _layer_state(layer)
    assert _layer_state(layer) == start
    q_proj = layer.self_attn.q_proj
    changes = {
        "scale": lambda: q_proj.scaling.__setitem__("default", 3.0),
        "disabled": lambda: setattr(q_proj, "_disable_adapters", True),
        "unfrozen": lambda: q_proj.base_layer.weight.requires_grad_(True),
        "replaced storage": lambda: setattr(layer.input_layernorm.weight, "data",
                                            layer.input_layernorm.weight.data.clone()),
        "training flag": lambda: layer.train(not layer.training),
        "attention dropout": lambda: setattr(layer.self_attn, "attention_dropout", 0.1),
    }
    for what, change in changes.items():
        before = _layer_state(layer)
        change()
        assert _layer_state(layer) != before, what
    # A dropout module's probability: a graph captured at p = 0 must not replay once dropout is on.
    layer_with_dropout = _layers(_lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.1))[0]
    dropout = next(m for m in layer_with_dropout.modules() if isinstance(m, torch.nn.Dropout))
    before = _layer_state(layer_with_dropout)
    dropout.p = 0.0
    assert _layer_state(layer_with_dropout) != before


def test_dropout_refuses_the_layer(tiny_checkpoint):
    assert dropout_reason(_layers(_lora_model(tiny_checkpoint("llama"), "16bit"))[0]) is None
    reason = dropout_reason(_layers(_lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.1))[0])
    assert reason is not None and "dropout p=0.1" in reason


def test_would_graph_walks_a_decoder_once(tiny_checkpoint):
    """LayerGraphs.would_graph (length buckets ask it at every training forward): false with dropout in the decoder
    or once a layer was refused; the decoder is walked for dropout at the first question only."""
    plain_model = _lora_model(tiny_checkpoint("llama"), "16bit")
    plain = plain_model.base_model.model.model
    with_dropout = _lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.1).base_model.model.model
    graphs = LayerGraphs()
    assert graphs.would_graph(plain) and not graphs.would_graph(with_dropout)
    next(m for m in with_dropout.modules() if isinstance(m, torch.nn.Dropout)).p = 0.0
    assert not graphs.would_graph(with_dropout)  # the first answer is kept; the layers' own state sees the change
    graphs._refuse(_LayerEntry(), _layers(plain_model)[0], "a test's reason")
    assert graphs.refusals == 1 and not graphs.would_graph(plain)


def test_recorded_outputs_are_seen(tiny_checkpoint):
    """_outputs_recorded is true inside a forward asked for hidden states or attentions, false in a plain one (the
    transformers API it reads must still exist: where it does not, any hook counts and this fails)."""
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    seen = []
    _layers(model)[0].register_forward_pre_hook(lambda layer, args: seen.append(_outputs_recorded(layer)))
    batch = _batch(model.device.type)
    with torch.no_grad():
        model(**batch)
        model(**batch, output_hidden_states=True)
        model(**batch, output_attentions=True)
        model(**batch)
    assert seen == [False, True, True, False]


def test_switch(monkeypatch):
    monkeypatch.delenv("FASTLM_CUDA_GRAPHS", raising=False)
    assert graphs_enabled() and OffloadedCheckpoint().graphs is not None
    monkeypatch.setenv("FASTLM_CUDA_GRAPHS", "0")
    assert not graphs_enabled() and OffloadedCheckpoint().graphs is None
    monkeypatch.setenv("FASTLM_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="FASTLM_CUDA_GRAPHS must be 1 or 0"):
        OffloadedCheckpoint()


def test_shared_buffer_holds_only_the_latest_output_unchanged():
    """The static x is taken as holding a layer's input only when that input is, unmodified, the tensor the latest
    forward replay returned (LayerGraph.forward records it); a copy of it, or it after an in-place change, is copied
    in again."""
    shared = _SharedBuffer(8, torch.float32, torch.device("cpu"))
    output = torch.ones(4)
    assert not shared.holds(output)
    shared.output = (weakref.ref(output), output._version)
    assert shared.holds(output) and not shared.holds(output.clone())
    output.add_(1)
    assert not shared.holds(output)


def test_cpu_layers_are_never_graphed(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("the model loads onto the GPU here")
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    checkpoint = _layers(model)[0]._gradient_checkpointing_func
    assert isinstance(checkpoint, OffloadedCheckpoint) and checkpoint.graphs is not None
    batch = _batch("cpu")
    for _ in range(3):
        model(**batch).loss.backward()
    assert checkpoint.graphs.captured() == 0


# ---------------------------------------------------------------- GPU

def _train(model, graphs, steps=4):
    """`steps` AdamW steps on fresh batches (a new mask tensor each step); (losses, LoRA weights)."""
    _layers(model)[0]._gradient_checkpointing_func.graphs = graphs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(steps):
        # The previous step's loss (and its autograd graph) is alive during this forward, where step 1 captures:
        # as in most training loops (layer_graphs._fresh_leaves says why that matters).
        loss = model(**_batch(model.device, seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(actual, expected, what):
    for name in expected:
        scale = expected[name].abs().max().item()
        error = (actual[name] - expected[name]).abs().max().item()
        assert error <= GPU_RTOL * max(scale, 1e-12), f"{what}: {name} differs by {error:.3g} (largest {scale:.3g})"


@pytest.mark.gpu
@pytest.mark.parametrize("model_type, precision", [("llama", "16bit"), ("llama", "4bit"), ("gemma2", "16bit"),
                                                   ("qwen3", "4bit"), ("phi3", "16bit"), ("qwen2", "16bit")])
def test_gpu_graphed_training_equals_eager(tiny_checkpoint, model_type, precision, monkeypatch):
    held, holds = [], _SharedBuffer.holds
    monkeypatch.setattr(_SharedBuffer, "holds", lambda self, x: (held.append(holds(self, x)), held[-1])[1])
    runs = {}
    for name in ("eager", "graphs"):
        model = _lora_model(tiny_checkpoint(model_type), precision)
        graphs = LayerGraphs() if name == "graphs" else None
        runs[name] = _train(model, graphs)
        if graphs is not None:  # step 0 warms up, step 1 captures: every layer replays from then on
            assert graphs.captured() == len(_layers(model)), graphs.why_eager
            # In steps 1-3 every layer after the first found its input, the forward replay before it's output, in
            # the static x and skipped its copy in (step 1: when its capture loaded it); backward loads never do.
            assert sum(held) == 3 * (len(_layers(model)) - 1), held
    torch.testing.assert_close(runs["graphs"][0], runs["eager"][0], rtol=GPU_RTOL, atol=0)
    _assert_close(runs["graphs"][1], runs["eager"][1], f"{model_type} {precision}")


def _loss_and_grads(model, batch, graphs, calls=1, disable_adapter=False):
    """The last of `calls` forward + backward passes of `batch` (graphs: None for eager)."""
    _layers(model)[0]._gradient_checkpointing_func.graphs = graphs
    model.train()
    for _ in range(calls):
        model.zero_grad(set_to_none=True)
        if disable_adapter:
            with model.disable_adapter():
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.gpu
def test_gpu_graphs_follow_adapter_state_and_shapes(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("FASTLM_LENGTH_BUCKETS", "0")  # the two lengths must stay two shapes here
    model = _lora_model(tiny_checkpoint("llama"), "4bit")
    model.get_base_model().enable_input_require_grads()  # dx flows into the embeddings' output: a gradient to check
    graphs = LayerGraphs()
    cases = {"start": dict(batch=_batch("cuda")),
             "longer sequence": dict(batch=_batch("cuda", seq=37)),
             "adapter disabled": dict(batch=_batch("cuda"), disable_adapter=True),
             "adapter enabled again": dict(batch=_batch("cuda"))}
    for what, case in cases.items():
        eager_loss, eager_grads = _loss_and_grads(model, case["batch"], None,
                                                  disable_adapter=case.get("disable_adapter", False))
        loss, grads = _loss_and_grads(model, case["batch"], graphs, calls=2,
                                      disable_adapter=case.get("disable_adapter", False))
        torch.testing.assert_close(loss, eager_loss, rtol=GPU_RTOL, atol=0, msg=what)
        assert grads.keys() == eager_grads.keys(), what
        _assert_close(grads, eager_grads, what)
    # start / longer sequence / disabled each captured once per layer; enabling again reused the first graphs.
    assert graphs.captured() == 3 * len(_layers(model)), graphs.why_eager


def test_which_first_calls_run_eagerly():
    """The layer's first call warms up; after it a length bucket is captured at its first call, any other length at
    its second; the set of lengths seen once stays bounded."""
    entry = _LayerEntry()
    calls = [("a", 64), ("a", 64), ("b", 128), ("c", 37), ("c", 37), ("d", 2048), ("e", None), ("e", None)]
    assert [entry.eager_first(key, length) is None for key, length in calls] == [
        False, True, True, False, True, True, False, True]
    for i in range(3 * SEEN_SIGNATURES_KEPT):
        entry.eager_first(("unique", i), 37)
    assert len(entry.seen) <= SEEN_SIGNATURES_KEPT


@pytest.mark.gpu
def test_gpu_new_shape_is_captured_at_its_first_call(tiny_checkpoint, monkeypatch):
    """Only a layer's first call runs eagerly (the warm-up); from then on a length bucket is captured at its first
    call and is exact there already; a length outside the buckets runs eagerly once first."""
    monkeypatch.setenv("FASTLM_LENGTH_BUCKETS", "0")  # the lengths must stay as given here
    model = _lora_model(tiny_checkpoint("llama"), "4bit")
    graphs = LayerGraphs()
    counts = []
    for seq in (64, 64, 128, 192, 128, 37, 37):
        batch = _batch("cuda", seq=seq)
        eager_loss, eager_grads = _loss_and_grads(model, batch, None)
        loss, grads = _loss_and_grads(model, batch, graphs)
        torch.testing.assert_close(loss, eager_loss, rtol=GPU_RTOL, atol=0, msg=f"seq {seq}")
        _assert_close(grads, eager_grads, f"seq {seq}")
        counts.append(graphs.captured() // len(_layers(model)))
    assert counts == [0, 1, 2, 3, 3, 3, 4], graphs.why_eager


@pytest.mark.gpu
def test_gpu_capture_keeps_cached_memory(tiny_checkpoint, monkeypatch):
    """Capturing a new shape returns no cached memory to the driver, device or pinned host (torch.cuda.graph's own
    entry empties both caches before each capture; the steps after it then allocate everything again). Only the
    model's first capture empties the device cache, once (the eager warm-up's working set)."""
    monkeypatch.setenv("FASTLM_LENGTH_BUCKETS", "0")
    model = _lora_model(tiny_checkpoint("llama"), "4bit")
    graphs = LayerGraphs()
    _loss_and_grads(model, _batch("cuda", seq=64), graphs)   # the layers' first calls: eager, the offload pins
    _loss_and_grads(model, _batch("cuda", seq=128), graphs)  # the first captures
    torch.empty(2**26, dtype=torch.uint8, device="cuda")  # freed at once: a 64 MiB block the device cache keeps
    device_freed = torch.cuda.memory_stats()["reserved_bytes.all.freed"]
    host_freed = torch.cuda.host_memory_stats().get("num_host_free")  # None where torch does not count it
    _loss_and_grads(model, _batch("cuda", seq=192), graphs)  # a new length: every layer captured again
    assert graphs.captured() == 2 * len(_layers(model)), graphs.why_eager
    assert torch.cuda.memory_stats()["reserved_bytes.all.freed"] == device_freed
    assert torch.cuda.host_memory_stats().get("num_host_free") == host_freed


@pytest.mark.gpu
def test_gpu_shapes_share_casts_and_train_like_eager(tiny_checkpoint, monkeypatch):
    """Two shapes in turn over AdamW steps: a layer's two graphs make their LoRA casts into one set of tensors (afresh
    whenever either runs, so after every optimizer step), and training matches eager training."""
    monkeypatch.setenv("FASTLM_LENGTH_BUCKETS", "0")  # the two lengths must stay two shapes here
    runs = {}
    for name in ("eager", "graphs"):
        model = _lora_model(tiny_checkpoint("llama"), "4bit")
        graphs = LayerGraphs() if name == "graphs" else None
        _layers(model)[0]._gradient_checkpointing_func.graphs = graphs
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        losses = []
        for step, seq in enumerate((21, 37, 21, 37, 37, 21, 21, 37)):
            loss = model(**_batch("cuda", seq=seq, seed=step)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        runs[name] = torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()
                                           if p.requires_grad}
    assert graphs.captured() == 2 * len(_layers(model)), graphs.why_eager
    for entry in graphs._layers.values():
        made = [sorted(v[1].data_ptr() for k, v in graph.memo.items() if isinstance(k, tuple) and k[0] in "AB")
                for graph in entry.graphs.values()]
        assert len(made) == 2 and made[0] and made[0] == made[1]
    torch.testing.assert_close(runs["graphs"][0], runs["eager"][0], rtol=GPU_RTOL, atol=0)
    _assert_close(runs["graphs"][1], runs["eager"][1], "two shapes in turn")


@pytest.mark.gpu
def test_gpu_returned_hidden_states_with_graphs(tiny_checkpoint):
    """Once the layers are graphed, a training forward asked for hidden states runs them eagerly (transformers
    collects hidden states with hooks a replay would skip): one per layer + the embeddings, the eager values; the
    next plain forward replays again."""
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    graphs = LayerGraphs()
    batch = _batch("cuda")
    _loss_and_grads(model, batch, graphs, calls=2)
    assert graphs.captured() == len(_layers(model)), graphs.why_eager

    def hidden_states(with_graphs):
        _layers(model)[0]._gradient_checkpointing_func.graphs = graphs if with_graphs else None
        out = model(**batch, output_hidden_states=True)
        out.loss.backward()
        return out.hidden_states

    eager, graphed = hidden_states(False), hidden_states(True)
    assert len(graphed) == len(eager) == len(_layers(model)) + 1
    for got, want in zip(graphed, eager):
        torch.testing.assert_close(got, want, rtol=GPU_RTOL, atol=0)
    assert "records the layer's outputs" in graphs.why_eager
    graphs.why_eager = None
    _loss_and_grads(model, batch, graphs)
    assert graphs.why_eager is None and graphs.captured() == len(_layers(model))  # replayed, no eager call


@pytest.mark.gpu
def test_gpu_layer_run_twice_before_backward(tiny_checkpoint):
    """The second forward replays over the graph's memo: the first call's backward must recompute eagerly."""
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    first, second = _batch("cuda", seed=5), _batch("cuda", seed=6)

    def both(graphs, calls):
        _layers(model)[0]._gradient_checkpointing_func.graphs = graphs
        model.train()  # checkpointing (and so the graphs) runs in training mode only
        for _ in range(calls):
            model.zero_grad(set_to_none=True)
            loss = model(**first).loss + 0.5 * model(**second).loss
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = both(None, 1)
    graphs = LayerGraphs()
    loss, grads = both(graphs, 2)
    assert graphs.captured() == len(_layers(model)), graphs.why_eager
    torch.testing.assert_close(loss, eager_loss, rtol=GPU_RTOL, atol=0)
    _assert_close(grads, eager_grads, "two forwards, one backward")


@pytest.mark.gpu
def test_gpu_dropout_layers_run_eagerly(tiny_checkpoint):
    model = _lora_model(tiny_checkpoint("llama"), "16bit", dropout=0.1)
    set_gradient_checkpointing(model, "unsloth")
    graphs = LayerGraphs()
    _loss_and_grads(model, _batch("cuda"), graphs, calls=3)
    assert graphs.captured() == 0


class _Batches(torch.utils.data.Dataset):
    """CPU batches for a DataLoader (workers and a pin-memory thread run beside the training loop)."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return _batch("cpu", seed=index)


@pytest.mark.gpu
def test_gpu_capture_beside_dataloader_workers(tiny_checkpoint):
    """Batches come from worker processes through DataLoader's pin-memory thread, which calls into CUDA while a layer
    is being captured: the captures must still succeed (a failure falls back to eager, and this test says so)."""
    model = _lora_model(tiny_checkpoint("llama"), "4bit")
    graphs = LayerGraphs()
    _layers(model)[0]._gradient_checkpointing_func.graphs = graphs
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=2, pin_memory=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for batch in loader:
        loss = model(**{k: v.to("cuda", non_blocking=True) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert graphs.broken is None, graphs.broken
    assert graphs.captured() == len(_layers(model)), graphs.why_eager


@pytest.mark.gpu
def test_gpu_capture_survives_collection_of_another_models_graphs(tiny_checkpoint, monkeypatch):
    """Another model's layer graphs, garbage in a reference cycle, collected by Python's cyclic garbage collector
    while a layer is being captured would be destroyed mid-capture, which invalidates it (bench/RESULTS.md run 119).
    Here the old model becomes cyclic garbage inside the new model's first capture, and a collection runs there
    whenever the automatic collector could run (it is on): every layer of the new model is still captured, and the
    old graphs are freed afterwards."""
    from fastlm.training import layer_graphs

    old = _lora_model(tiny_checkpoint("llama"), "16bit")
    old_graphs = LayerGraphs()
    _loss_and_grads(old, _batch("cuda"), old_graphs, calls=2)
    assert old_graphs.captured() == len(_layers(old)), old_graphs.why_eager
    freed = weakref.ref(old_graphs)
    cycle = [old, old_graphs]
    cycle.append(cycle)  # only the cyclic collector can free it once `box` lets go
    box = {"garbage": cycle}
    del old, old_graphs, cycle
    take_saved, collected_inside = layer_graphs.take_saved, []

    def take_saved_dropping_the_old_model(memo):  # called inside the forward graph's capture
        if box and torch.cuda.is_current_stream_capturing():
            box.clear()
            if gc.isenabled():  # the automatic collector may run at any allocation here: let it
                collected_inside.append(gc.collect())
        return take_saved(memo)

    monkeypatch.setattr(layer_graphs, "take_saved", take_saved_dropping_the_old_model)
    model = _lora_model(tiny_checkpoint("llama"), "16bit")
    graphs = LayerGraphs()
    _loss_and_grads(model, _batch("cuda"), graphs, calls=2)
    assert not box, "the old model was not dropped during a capture: the test did not test anything"
    assert graphs.broken is None and not collected_inside, graphs.broken
    assert graphs.captured() == len(_layers(model)), graphs.why_eager
    gc.collect()
    assert freed() is None, "the old model's graphs were never freed"


def test_no_cyclic_gc_restores_the_collector():
    """_no_cyclic_gc turns the collector off inside, and back to how it was after, exceptions included."""
    from fastlm.training.layer_graphs import _no_cyclic_gc

    was = gc.isenabled()
    try:
        for before in (True, False):
            (gc.enable if before else gc.disable)()
            with pytest.raises(KeyError):
                with _no_cyclic_gc():
                    assert not gc.isenabled()
                    raise KeyError("inside")
            assert gc.isenabled() == before
    finally:
        (gc.enable if was else gc.disable)()
