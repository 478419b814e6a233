"""CUDA graphs of checkpointed decoder layers (offloaded checkpointing on a CUDA device).

Why: the eager training step is bound by the host, not the GPU (bench/RESULTS.md runs 7, 12, 15: ~8 us of host
time per PyTorch op and 15-30 us per Triton or cuBLAS launch on the H200 machine; at Llama-3.2-1B the GPU's
compute stream needs ~120 ms of a ~140-230 ms step). A CUDA graph replays all of a layer's GPU work with one
launch, so the host's cost per layer drops from hundreds of calls to a few. Measured (runs 20-24, 1B QLoRA batch
4): 130-133 ms per step with the graphs against 181-230 ms without, in the same device calls.

What is captured, per decoder layer and input signature (shapes and dtypes of the input and of the tensors the
layer is called with, its non-tensor arguments, its parameters' identities and storage, its adapters' state,
autocast), the two computations offloaded checkpointing runs per layer:
    forward graph    the layer under no_grad                       reads x, writes the output over x
    backward graph   the recomputation with grad, then             reads x and dy, writes dx over dy and the
                     torch.autograd.grad w.r.t. x (when x needs     trainable parameters' gradients into one
                     grad) and the layer's trainable parameters     flat buffer
Both graphs of a layer share one `reuse_casts` memo, as the eager path does (LoRA casts and x A^T products made by
the forward graph are read by the backward graph), and the recomputation skips what it skips eagerly. What the
forward saves for the recomputation (the attention's output and log-sum-exp, fastlm/models/saved_attention.py) the
forward graph copies into static buffers (LayerGraph.saved); they are copied out after its replay, offloaded with
the layer input, and copied back in before the backward replay. The LoRA
casts (stacked A, scaled block-diagonal B in the compute dtype) are the same for every signature: the forward graphs
of all a layer's signatures make them into one set of tensors (reuse_casts' cast_storage), so a new signature adds
only its own x A^T products to the pool.

Buffers: x (B, T, H), dy (B, T, H), the tensors bound as keyword arguments (cos/sin, mask, position ids) and the
flat gradient buffer are static tensors shared by every layer graph of one signature (the graphs run one at a time
on one stream); x and dy are views of one buffer per device and dtype shared by all signatures (_static_pair).
Before a replay the inputs are copied in (a bound tensor only when it is not the one already there, x only when it
is not the output the latest forward replay left in x, dy only when it is not already in grad); after it the
results are copied out (x's output, dx, one copy of the flat gradients whose slices become the parameters'
gradients), except dx for a layer fed directly by the graphed layer before it:
that layer's backward, next, reads it from grad itself (LayerGraph.backward's static_dx). Everything else a graph
allocates lives in one private memory pool per device shared by all graphs, reused from graph to graph; it is
reserved, not allocated, memory for torch.cuda's statistics (bench/RESULTS.md reports both).

When a layer is not graphed (it runs as before, eagerly):
  - the layer's first call (the warm-up of what is made lazily, once), and the first call of a signature whose
    sequence length is not a length bucket (it may never come again); a length bucket is captured at its first
    call, after a warm-up of its own (_LayerEntry.eager_first, LayerGraphs._capture); or more than
    MAX_SIGNATURES_PER_LAYER signatures seen for the layer (fastlm's causal-LM forward rounds training batches up
    to a few lengths, fastlm/training/length_buckets.py, to keep them few);
  - a forward that returns hidden states or attentions (output_hidden_states / output_attentions: transformers
    collects them with hooks the graphs would not run);
  - dropout with p > 0 anywhere in the layer (random numbers would be frozen into the graph), a layer whose output
    is not one tensor shaped like its input, an argument of a type this module does not know, extra positional
    arguments; each logged once;
  - a capture that fails (an op that synchronises with the host, for example): logged as a warning, and no layer
    of this model is graphed afterwards.
A backward that finds its layer's forward graph replayed again since its own forward (the same layer run twice
before one backward) recomputes eagerly: the graph's memo holds the later call's products.

Switch: FASTLM_CUDA_GRAPHS=0 turns the graphs off (default 1: on wherever offloaded checkpointing runs on CUDA);
read when offloaded checkpointing is set up (get_peft_model, or set_gradient_checkpointing(model, "unsloth")).
"""
import contextlib
import functools
import gc
import logging
import os
import weakref
from typing import Optional

import torch
from torch import nn

from fastlm.kernels.lora import SAVED_FOR_RECOMPUTATION, live_workspaces, restore_saved, reuse_casts, take_saved
from fastlm.training import length_buckets
from fastlm.training.fused_lora import projection_state

try:  # the outputs transformers records in the running forward (see _outputs_recorded)
    from transformers.utils.output_capturing import _active_collector as _transformers_collector
except ImportError:
    _transformers_collector = None

logger = logging.getLogger("fastlm")

SWITCH = "FASTLM_CUDA_GRAPHS"
# Signatures (mostly batch shapes) captured per layer before new ones run eagerly: the 16 length buckets from 64 to
# 2048 tokens (fastlm/training/length_buckets.py) and a smaller last batch for some of them. Each costs one capture
# per layer and per layer its x A^T products, kept in the graphs' pool (M x ranks: ~0.6 MB per layer at Llama-3.2-1B
# batch 4 x 2048); the LoRA casts (~2 MB per layer at 1B, ~4 MB at 8B), x and dy are shared by all signatures
# (reuse_casts' cast_storage, _static_pair) and the rest of the pool is the largest signature's working set.
# bench/RESULTS.md run 37, before the casts were shared: 12 lengths at 1B QLoRA, pool 0.94 GiB against 0.46 for one.
MAX_SIGNATURES_PER_LAYER = 24
# Signatures remembered per layer as run once, waiting for a second call to be captured; the set is emptied when it
# reaches this size (a length that does come back then runs eagerly once more). A rule: 4x the signatures kept.
SEEN_SIGNATURES_KEPT = 4 * MAX_SIGNATURES_PER_LAYER


def graphs_enabled() -> bool:
    """FASTLM_CUDA_GRAPHS: "1" (default) or "0"."""
    setting = os.environ.get(SWITCH, "1").strip()
    if setting not in ("0", "1"):
        raise ValueError(f"{SWITCH} must be 1 or 0, got {os.environ[SWITCH]!r}.")
    return setting == "1"


class NotGraphable(Exception):
    """Why a layer call cannot be replayed from a graph (the message is logged)."""


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _describe(value, tensors: list):
    """A hashable description of a bound argument (tensors by shape/dtype/device, appended to `tensors` in order)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_describe(v, tensors) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((k, _describe(v, tensors)) for k, v in value.items())
    if isinstance(value, nn.Module):
        return ("module", id(value))
    if isinstance(value, _PLAIN):
        return value
    raise NotGraphable(f"an argument of type {type(value).__name__}")


def _substitute(value, replacements):
    """`value` with its tensors replaced, in _describe's order, by the next items of the iterator `replacements`."""
    if isinstance(value, torch.Tensor):
        return next(replacements)
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_substitute(v, replacements) for v in value)
    if isinstance(value, list):
        return [_substitute(v, replacements) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, replacements) for k, v in value.items()}
    if isinstance(value, tuple):  # a named tuple
        return type(value)(*[_substitute(v, replacements) for v in value])
    return value


def _layer_state(layer: nn.Module) -> tuple:
    """What the layer's forward path depends on besides its arguments: training flag, parameters (identity,
    storage, requires_grad), each LoRA projection's adapter state (fused_lora.projection_state), dropout
    probabilities (a layer captured without dropout whose dropout is turned on is then refused, not replayed), and
    the attention implementation chosen in the config."""
    state = [layer.training]
    for module in layer.modules():
        own = module.__dict__
        if "lora_A" in own["_modules"]:
            state.append(projection_state(module))
        if isinstance(module, nn.modules.dropout._DropoutNd):
            state.append(module.p)
        if "attention_dropout" in own:
            state.append(own["attention_dropout"])
        for param in own["_parameters"].values():
            if param is not None:
                state.append((id(param), param.data_ptr(), param.requires_grad))
        config = own.get("config")
        if config is not None:
            state.append(getattr(config, "_attn_implementation", None))
    return tuple(state)


def dropout_reason(layer: nn.Module) -> Optional[str]:
    for name, module in layer.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"dropout p={module.p} at {name}"
        if getattr(module, "attention_dropout", 0) not in (0, 0.0, None):
            return f"attention dropout {module.attention_dropout} at {name}"
    return None


class _SharedBuffer:
    """One device's static buffer that the x and grad of every signature are views of (LayerGraphs._static_pair),
    and what its x part holds: `output` is (weakref, version) of the tensor the latest forward replay returned
    (LayerGraph.forward's copy of what the replay wrote over x), None once anything else wrote there."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.zeros(numel, dtype=dtype, device=device)
        self.output = None

    def holds(self, x: torch.Tensor) -> bool:
        """Whether x is, unchanged, the output of the latest forward replay, whose values are still in x's part."""
        return self.output is not None and self.output[0]() is x and self.output[1] == x._version


class _Statics:
    """Static inputs/outputs shared by the layer graphs of one signature: x (B, T, H) (the forward's output is
    written over it), grad (B, T, H) (dy in, dx out), both views of the device's shared static buffer (`shared`,
    see LayerGraphs._static_pair), and one buffer per bound tensor."""

    def __init__(self, x: torch.Tensor, grad: torch.Tensor, shared: _SharedBuffer, bound: list):
        self.x, self.grad, self.shared = x, grad, shared
        self.bound = [torch.empty_like(t) for t in bound]
        self.sources = [None] * len(bound)  # (weakref, version) of the tensor each bound buffer holds
        self.last_output = None  # weakref to the output the latest forward replay over these statics returned

    @torch.no_grad()  # a copy tracked by autograd into a view would give the shared buffer, and every view, a grad_fn
    def load(self, x: torch.Tensor, bound: list) -> None:
        """Copy x and the bound tensors in, each unless its buffer holds it already: x when it is the output of the
        latest forward replay (the layer before, a graph too, feeding this one: its values are still in the shared
        x, where every signature's x starts; 15 copies of 32 MiB per step at Llama-3.2-1B batch 4, bench/RESULTS.md
        run 118), a bound tensor when it is the one copied last time."""
        if not self.shared.holds(x):
            self.x.copy_(x)
        self.shared.output = None  # a replay comes next and may write x
        for i, (buffer, tensor) in enumerate(zip(self.bound, bound)):
            held = self.sources[i]
            if held is not None and held[0]() is tensor and held[1] == tensor._version:
                continue  # cos/sin and the mask are the same tensors for every layer of a step
            buffer.copy_(tensor)
            self.sources[i] = (weakref.ref(tensor), tensor._version)


class LayerGraph:
    """The forward and backward graphs of one layer for one signature, and how to replay them."""

    def __init__(self, statics: _Statics, flat: Optional[torch.Tensor], slots: list, has_dx: bool, saved: list):
        self.statics, self.flat, self.slots, self.has_dx = statics, flat, slots, has_dx
        self.saved = saved  # static views the forward graph writes the layer's saved tensors into (_saved_views)
        self.forward_graph = torch.cuda.CUDAGraph()
        self.backward_graph = torch.cuda.CUDAGraph()
        self.memo = {}
        self.generation = 0  # forward replays so far; a backward checks that its forward was the latest

    def follows(self, x: torch.Tensor) -> bool:
        """Whether x is the output of the latest forward replay over the same statics: the layer before this one ran
        as a graph of the same signature and feeds this one directly (see backward's static_dx)."""
        latest = self.statics.last_output
        return latest is not None and latest() is x

    def forward(self, x: torch.Tensor, bound: list):
        """(the layer's output for x (B, T, H), [the tensors its forward saved for the recomputation]), fresh
        tensors. Call in no_grad (inside the autograd Function)."""
        self.statics.load(x, bound)
        self.forward_graph.replay()
        self.generation += 1
        output = self.statics.x.clone()
        self.statics.last_output = weakref.ref(output)
        self.statics.shared.output = (weakref.ref(output), output._version)
        return output, [buffer.clone() for buffer in self.saved]

    def backward(self, x: torch.Tensor, bound: list, grad_output: Optional[torch.Tensor], static_dx: bool = False,
                 saved=()):
        """(dx or None, [gradient or None per trainable parameter]) for the layer's input x and output gradient.

        saved: the tensors `forward` returned besides the output (from host memory), in its order.

        static_dx: return statics.grad itself as dx instead of a copy. Only for a layer that `follows` the one before
        it: that layer's backward (graphed or eager) is then the only reader of dx and runs next, before any replay
        writes statics.grad again; replayed, it finds dy already in place and skips its copy in. Saves two 32 MiB
        copies per layer at Llama-3.2-1B batch 4 (~33 us of ~4.8 ms: bench/RESULTS.md run 77)."""
        self.statics.load(x, bound)
        if len(saved) != len(self.saved):
            raise RuntimeError(f"a layer graph's backward got {len(saved)} saved tensors, its forward made "
                               f"{len(self.saved)}")
        with torch.no_grad():
            for buffer, tensor in zip(self.saved, saved):
                buffer.copy_(tensor)
            if grad_output is None:
                self.statics.grad.zero_()
            elif not _same_memory(grad_output, self.statics.grad):
                self.statics.grad.copy_(grad_output)
        self.backward_graph.replay()
        dx = None
        if self.has_dx:
            dx = self.statics.grad if static_dx else self.statics.grad.clone()
        flat = self.flat.clone() if self.flat is not None else None
        return dx, [None if slot is None else flat[slot[0]:slot[0] + slot[1]].view(slot[2]) for slot in self.slots]


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements of the same memory (a copy from one to the other would do nothing)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class _LayerEntry:
    def __init__(self):
        self.graphs = {}     # signature -> LayerGraph
        self.seen = set()    # signatures run eagerly once, not captured yet (empty with no graph: never called)
        self.casts = {}      # the LoRA casts all its graphs write and read (reuse_casts' cast_storage)
        self.refused = None  # why this layer is never graphed, once known

    def eager_first(self, key, length: Optional[int]) -> Optional[str]:
        """Why this call, of a signature not captured yet, runs eagerly; None: capture it now.

        The layer's first call is the warm-up of what is made once (cuBLAS handles, Triton compilations, offload
        buffers). After it, a signature whose sequence length is a length bucket is captured at its first call:
        buckets come back (fastlm/training/length_buckets.py). Any other length (a left-padded batch, buckets off)
        may never come again, so it is captured at its second call only, as every signature was until
        bench/RESULTS.md run 43. length: the layer input's sequence length (None if it has no such dimension)."""
        if not (self.graphs or self.seen):
            self.seen.add(key)
            return "the layer's first call"
        if key in self.seen or (length is not None and length_buckets.bucket_length(length) == length):
            return None
        if len(self.seen) >= SEEN_SIGNATURES_KEPT:  # a stream of new lengths must not grow this without bound
            self.seen.clear()
        self.seen.add(key)
        return "first call with a length outside the length buckets"


class LayerGraphs:
    """The graphs of one model's checkpointed layers (owned by its OffloadedCheckpoint)."""

    def __init__(self):
        self._layers = weakref.WeakKeyDictionary()  # layer module -> _LayerEntry
        self._statics = {}   # signature of the arguments -> _Statics
        self._shared = {}    # (device, dtype) -> _SharedBuffer: x and grad of every signature are views of it
        self._shared_saved = {}  # (device, dtype) -> the static buffer of the saved tensors (_saved_views)
        self._flats = {}     # (device, dtype, total) -> flat gradient buffer
        self._pools = {}     # device -> graph memory pool handle
        self._streams = {}   # device -> capture stream
        self.broken = None   # the failure that turned graphs off for this model
        self.refusals = 0    # layers refused so far (dropout, an argument of unknown type, ...)
        self._dropout_free = weakref.WeakKeyDictionary()  # decoder module -> no dropout when first asked
        self.why_eager = None
        self._logged = set()

    def would_graph(self, decoder: nn.Module) -> bool:
        """Whether the layers of `decoder` (the module holding them) are, or will be, replayed as graphs: no capture
        has failed, no layer has been refused, and the decoder had no dropout when first asked.

        Asked by length_buckets at every training forward, before the first kernel of the step is launched, where
        walking the decoder for dropout (dropout_reason: 1,333 modules at Llama-3.2-1B with LoRA) cost ~4.5 ms per
        step on the H200's host (bench/RESULTS.md run 54: 1B QLoRA batch 4, 138.2 -> 133.2 ms), so each decoder is
        walked once. Dropout turned on later is caught by the layers themselves: it changes their _layer_state, and
        the capture that follows refuses them."""
        if self.broken is not None or self.refusals:
            return False
        free = self._dropout_free.get(decoder)
        if free is None:
            free = self._dropout_free[decoder] = dropout_reason(decoder) is None
        return free

    def captured(self) -> int:
        """How many layer graphs (forward + backward pairs) are held."""
        return sum(len(entry.graphs) for entry in self._layers.values())

    def _log_once(self, message: str, warning: bool = False) -> None:
        if message not in self._logged:
            self._logged.add(message)
            (logger.warning if warning else logger.info)("fastlm: %s", message)

    def plan(self, layer: nn.Module, function, args: tuple, params: list):
        """(LayerGraph, bound tensors) to replay for this call, or None to run it eagerly."""
        if self.broken is not None or len(args) != 1 or not isinstance(function, functools.partial):
            return self._eager("graphs broken, several positional arguments or not a partial")
        x = args[0]
        if not x.is_cuda:
            return self._eager("not on CUDA")
        entry = self._layers.get(layer)
        if entry is None:
            entry = self._layers[layer] = _LayerEntry()
        if entry.refused is not None:
            return self._eager(entry.refused)
        if _outputs_recorded(layer):
            return self._eager("transformers records the layer's outputs (output_hidden_states / output_attentions)")
        bound = []
        try:
            arguments = _describe((function.args, function.keywords), bound)
        except NotGraphable as why:
            return self._refuse(entry, layer, str(why))
        autocast = tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in ("cpu", "cuda"))
        signature = (tuple(x.shape), x.dtype, x.device, x.requires_grad, arguments)
        key = (signature, autocast, _layer_state(layer))
        graph = entry.graphs.get(key)
        if graph is not None:
            return graph, bound
        why = entry.eager_first(key, x.shape[1] if x.dim() == 3 and x.shape[1] > 0 else None)
        if why is not None:
            return self._eager(why)
        if len(entry.graphs) >= MAX_SIGNATURES_PER_LAYER:
            self._log_once(f"a decoder layer was called with more than {MAX_SIGNATURES_PER_LAYER} input shapes; "
                           "new shapes run without CUDA graphs (fewer distinct batch shapes, e.g. packing to a "
                           "fixed length, avoid this)")
            return self._eager("too many signatures")
        reason = dropout_reason(layer)
        if reason is not None:
            return self._refuse(entry, layer, reason)
        try:
            with _fresh_leaves(layer, params) as leaves, _autocast_cache_off():
                graph = self._capture(function, x, bound, leaves, signature, entry.casts)
        except NotGraphable as why:
            return self._refuse(entry, layer, str(why))
        except RuntimeError as error:
            self.broken = str(error)  # the text only: the traceback would keep the failed capture's tensors
            self._log_once(f"capturing a decoder layer in a CUDA graph failed ({error}); this model's layers run "
                           f"without CUDA graphs from now on (set {SWITCH}=0 to skip the attempt)", warning=True)
            return self._eager(self.broken)
        entry.seen.discard(key)
        entry.graphs[key] = graph
        return graph, bound

    def _refuse(self, entry: _LayerEntry, layer: nn.Module, reason: str) -> None:
        entry.refused = reason
        self.refusals += 1
        self._log_once(f"{type(layer).__name__} runs without CUDA graphs: {reason}")
        return self._eager(reason)

    def _eager(self, reason: str) -> None:
        self.why_eager = reason  # the latest eager call's reason, for tests and debugging
        return None

    def _static_pair(self, x: torch.Tensor) -> tuple:
        """(x, grad, the _SharedBuffer): two (B, T, H) views, at offsets 0 and x.numel(), of one buffer shared by every
        signature on x's device and dtype, replaced by a new one (zeroed, exactly 2 x.numel()) when a signature needs
        more.

        Sharing is safe because replays run one at a time on one stream and each replay copies in all it reads
        (LayerGraph.forward / backward) but what is there already (_Statics.load: the latest forward replay's
        output, tracked per buffer, whichever signature's views read it): no signature's values live in x or grad
        between its replays. So the static memory is the largest signature's when it comes first, and never more
        than the sum over signatures (batches of 16 length buckets from 64 to 2048 tokens would sum to 6x the
        longest's). A graph keeps the buffer it was captured with alive through its views.
        """
        key = (x.device, x.dtype)
        shared = self._shared.get(key)
        if shared is None or shared.buffer.numel() < 2 * x.numel():
            shared = self._shared[key] = _SharedBuffer(2 * x.numel(), x.dtype, x.device)
        n = x.numel()
        return shared.buffer[:n].view(x.shape), shared.buffer[n:2 * n].view(x.shape), shared

    def _saved_views(self, like: list) -> list:
        """Static tensors for `like`, [(shape, dtype, device)] of the saved tensors of a layer's forward
        (fastlm.kernels.lora's take_saved): consecutive views of one buffer per device and dtype shared by every
        layer graph, replaced by a larger one (zeroed) when a graph needs more. Shared as x and grad are
        (_static_pair): every replay copies in what it reads and a forward's saved tensors are copied out right after
        it."""
        totals = {}
        for shape, dtype, device in like:
            totals[(device, dtype)] = totals.get((device, dtype), 0) + shape.numel()
        for key, total in totals.items():
            buffer = self._shared_saved.get(key)
            if buffer is None or buffer.numel() < total:
                self._shared_saved[key] = torch.zeros(total, dtype=key[1], device=key[0])
        offsets, views = {}, []
        for shape, dtype, device in like:
            start = offsets.get((device, dtype), 0)
            views.append(self._shared_saved[(device, dtype)][start:start + shape.numel()].view(shape))
            offsets[(device, dtype)] = start + shape.numel()
        return views

    def _capture(self, function, x: torch.Tensor, bound: list, params: list, signature, casts: dict) -> LayerGraph:
        statics = self._statics.get(signature)
        if statics is None:
            statics = self._statics[signature] = _Statics(*self._static_pair(x), bound)
        replacements = iter(statics.bound)  # one iterator: args first, then keywords, as _describe saw them
        static_args = _substitute(function.args, replacements)
        run = functools.partial(function.func, *static_args, **_substitute(function.keywords, replacements))
        device = x.device
        first = device not in self._pools
        if first:
            self._pools[device] = torch.cuda.graph_pool_handle()
            self._streams[device] = torch.cuda.Stream(device=device)
        stream, current = self._streams[device], torch.cuda.current_stream(device)
        statics.load(x, bound)
        need_x = x.requires_grad

        # Warm-up: checks what the layer returns and which gradients exist, and lets every lazy initialisation
        # (Triton's compilation for this shape; cuBLAS's workspace for the capture stream) happen outside the
        # capture. The device's first warm-up runs on the capture stream (cuBLAS's workspace is per stream), later
        # ones on the current stream: blocks freed on the capture stream stay cached for that stream alone, where
        # the training step's own allocations on the current stream reuse these (bench/RESULTS.md runs 49-50). Its
        # autograd graph is freed before the capture (del below; _fresh_leaves says why that matters).
        stream.wait_stream(current)
        with torch.cuda.stream(stream if first else current):
            memo = {}
            with torch.no_grad(), reuse_casts(memo):
                y = run(statics.x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
                raise NotGraphable("its output is not one tensor shaped like its input")
            saved_like = [(t.shape, t.dtype, t.device) for t in memo.get(SAVED_FOR_RECOMPUTATION, [])]
            grads = _differentiate(run, statics, params, need_x, memo)
        current.wait_stream(stream)
        param_grads = grads[1:] if need_x else grads
        present = [g for g in param_grads if g is not None]
        if len({g.dtype for g in present}) > 1:
            raise NotGraphable("its trainable parameters have different dtypes")
        slots, offset = [], 0
        for g in param_grads:
            slots.append(None if g is None else (offset, g.numel(), g.shape))
            offset += 0 if g is None else g.numel()
        flat = None
        if present:
            flat_key = (device, present[0].dtype, offset)
            flat = self._flats.get(flat_key)
            if flat is None:
                flat = self._flats[flat_key] = torch.empty(offset, dtype=present[0].dtype, device=device)
        saved = self._saved_views(saved_like)
        graph = LayerGraph(statics, flat, slots, has_dx=need_x and grads[0] is not None, saved=saved)
        del y, grads, param_grads, present, memo
        if first:
            # Once, before the first capture: the device cache holds the eager warm-up step's working set and the
            # first warm-up's blocks (on the capture stream), which the graphs' pool takes over from now on (kept,
            # they added 0.4 GiB to the reserved peak at Llama-3.2-1B QLoRA batch 4, bench/RESULTS.md runs 47-48).
            # Later captures keep the caches (see _capturing).
            torch.cuda.empty_cache()

        pool = self._pools[device]
        with _capturing(graph.forward_graph, pool, stream):
            with torch.no_grad(), reuse_casts(graph.memo, cast_storage=casts):
                y = run(statics.x)
                statics.x.copy_(y)
                made = take_saved(graph.memo)
                if [(t.shape, t.dtype, t.device) for t in made] != saved_like:
                    raise NotGraphable("the tensors its forward saves for the recomputation changed between runs")
                for buffer, tensor in zip(saved, made):
                    buffer.copy_(tensor)
            del y, made  # their memory goes back to the pool: the layer's saved tensors live in `saved`
        restore_saved(graph.memo, saved)  # the backward graph's recomputation reads them there
        with _capturing(graph.backward_graph, pool, stream):
            grads = _differentiate(run, statics, params, need_x, graph.memo)
            if graph.has_dx:
                statics.grad.copy_(grads[0])
            present = [g.reshape(-1) for g in (grads[1:] if need_x else grads) if g is not None]
            if present:
                torch.cat(present, out=flat)
            del grads, present
        # The shared dequantization workspaces the graphs write into: a later, larger weight (another model) makes
        # fused LoRA allocate a new one; this reference keeps the captured address valid.
        graph.workspaces = live_workspaces()
        return graph


@contextlib.contextmanager
def _capturing(cuda_graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream):
    """Capture the work queued inside the block on `stream` into `cuda_graph`, its memory from `pool`.

    What torch.cuda.graph does, without what its __enter__ adds before each capture: a device synchronize, an
    empty_cache of the caching allocator and of the pinned host memory cache. Those return every cached block to
    the driver 2 x (layers) times per new shape, and the steps after a capture then allocate them again: offloaded
    checkpointing's pinned host buffers (one per layer, ~0.5 GiB at Llama-3.2-1B batch 4 x 2048) and the step's
    device memory. bench/RESULTS.md run 48: 1.4x the tokens/s over 60 steps of lengths 256-2048 at Llama-3.2-1B
    and Llama-3.1-8B QLoRA (pinned allocations 347 -> 51 at 1B); the same once every bucket is captured.

    "thread_local": only this thread's CUDA calls are checked during the capture. Under the default "global" mode a
    call from any other thread, e.g. a DataLoader pin-memory thread allocating pinned memory for the next batch
    (num_workers > 0), breaks the capture and fails in that thread, which then raises on the next batch (PyTorch
    documents thread_local for this; pytorch/pytorch#174724). Every capture of the supported families succeeded
    under "global" (bench/RESULTS.md run 22), so no other thread calls CUDA unsafely in them and the graphs are the
    same.

    Python's cyclic garbage collector is off during the capture (_no_cyclic_gc): torch.cuda.graph's gc.collect()
    before each capture is left out with the rest."""
    with torch.cuda.stream(stream), _no_cyclic_gc():
        cuda_graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            cuda_graph.capture_end()


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cyclic garbage collector off within the block, then as it was. A collection inside a capture can
    destroy CUDA graphs that became garbage in a reference cycle (another model's, an earlier LayerGraphs'): a graph's
    destruction is not permitted while this thread captures, and it invalidates the capture (bench/RESULTS.md run
    119: the capture of a qwen3 layer failed amid ~60 "operation not permitted when stream is capturing (function
    reset)" warnings, the graphs of the test's previous model being freed). torch.cuda.graph runs gc.collect()
    before each capture instead: a full collection per capture, 2 per layer and signature."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _outputs_recorded(layer: nn.Module) -> bool:
    """Whether transformers records layer outputs in this forward (output_hidden_states / output_attentions): its
    forward hooks on the layer and its modules append to the output lists at every call, which a replay would skip
    and a capture (which runs the layer four times) would repeat. Transformers keeps the lists in a context variable,
    set for the model's forward (`transformers.utils.output_capturing`, 5.17 to 5.24); where that is not found, any
    forward hook in the layer counts as recording."""
    if _transformers_collector is None:
        return any(module._forward_hooks or module._forward_pre_hooks for module in layer.modules())
    return bool(_transformers_collector.get())


@contextlib.contextmanager
def _autocast_cache_off():
    """Autocast keeps its casts of leaf parameters in a cache emptied when the outermost autocast block exits: a
    cast made during a capture would be freed while the graph still writes it (torch.cuda.make_graphed_callables
    asks for cache_enabled=False for the same reason)."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


@contextlib.contextmanager
def _fresh_leaves(layer: nn.Module, params: list):
    """Within the block the layer's trainable parameters are new Parameter objects over the same storage (yields
    them in `params`' order); the originals are put back after it.

    Why: the autograd engine syncs a gradient with the stream its leaf's AccumulateGrad node was created on. The
    real parameters' nodes were made on the default stream by the eager warm-up step, and stay alive while any
    earlier graph does (a training loop holding the last step's loss): syncing the capture stream with the
    default stream invalidates the capture. Fresh leaves get their nodes on the capture stream: the warm-up's
    nodes for them (made on whichever stream it runs) go with its autograd graph, freed before the capture starts
    (a leaf holds its node weakly). Sharing the storage, the graphs read the parameters the optimizer updates."""
    wanted = {id(p): i for i, p in enumerate(params)}
    fresh = [None] * len(params)
    swapped = []
    for module in layer.modules():
        for name, param in module.__dict__["_parameters"].items():
            index = wanted.get(id(param)) if param is not None else None
            if index is not None:
                if fresh[index] is None:
                    fresh[index] = nn.Parameter(param.detach(), requires_grad=True)
                module._parameters[name] = fresh[index]
                swapped.append((module, name, param))
    if any(f is None for f in fresh):
        raise NotGraphable("a trainable parameter it is given is not one of its own")
    try:
        yield fresh
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def _differentiate(run, statics: _Statics, params: list, need_x: bool, memo: dict) -> tuple:
    """Recompute the layer from statics.x with grad and return d(output)/d([x] + params) for dy = statics.grad."""
    with torch.enable_grad(), reuse_casts(memo, recomputing=True):
        x = statics.x.detach().requires_grad_(need_x)
        y = run(x)
    inputs = ([x] if need_x else []) + list(params)
    return torch.autograd.grad(y, inputs, statics.grad, allow_unused=True)
