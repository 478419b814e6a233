"""Offloaded gradient checkpointing (`use_gradient_checkpointing="unsloth"`).

Plain checkpointing keeps each decoder layer's input on the GPU until backward and recomputes the layer from it.
Here that input (hidden states, (B, T, H) in the model's dtype: 32 MiB per layer at Llama-3.2-1B, batch 4 x 2048
tokens, bf16) waits in pinned host memory instead, so GPU memory for saved activations no longer grows with depth.

What lives where, per checkpointed layer:
    forward   the layer runs under no_grad on the compute stream; its input x is copied to a pinned host buffer
              on a side stream (one per device) that first waits for the compute stream, so the copy overlaps the
              layer's compute. x.record_stream(side) keeps x's GPU memory from being reused before the copy ends;
              the caller drops x when the next layer has run, so the GPU copy is released once the offload is done.
    backward  the layer's input is copied back into a buffer allocated on the compute stream (side stream waits
              for the compute stream, copies, record_stream(side) guards the buffer if the graph is dropped
              first); the compute stream waits on that copy's event. Then the layer is recomputed with grad
              under the forward's RNG and autocast state and differentiated with torch.autograd.grad.
    prefetch  when layer k's backward starts it also starts the copy back of layer k-1's input (the entry saved
              just before it in forward), so that copy overlaps layer k's recomputation and backward. At most
              two layer inputs are on the GPU at a time.
    last      the latest saved input also stays referenced on the GPU until the next layer saves its own: for the
              last layer that is never, so its backward (the first) uses it as is. Copied back, it had no
              earlier backward to overlap with and the GPU waited for it (0.65 ms per step at Llama-3.2-1B batch 4:
              bench/RESULTS.md run 55), for one layer input (32 MiB there) held through the loss (run 56).
    throttle  before a copy starts, the host waits until at most MAX_COPIES_IN_FLIGHT earlier copies are
              unfinished: a host far ahead of the GPU (CUDA-graphed layers) would otherwise keep every pending
              input allocated.
    saved     tensors the layer's forward pass keeps for its recomputation (the attention's output and log-sum-exp,
              fastlm/models/saved_attention.py: 33 MiB per layer at 1B) travel with the input: offloaded once the
              layer has run, kept on the GPU while latest, prefetched with it, handed back to the recomputation.
On a CPU nothing moves: the input is kept as is (plain checkpointing by the same code, so CPU tests run it).

Gradients: the layer's trainable parameters (LoRA A/B, modules_to_save copies) are inputs of the autograd
Function, so they receive gradients even when the layer input does not require grad (frozen embeddings, no
enable_input_require_grads). Tensors bound as keyword arguments (attention_mask, position_embeddings) are kept
by reference; if one of them requires grad, the call falls back to torch's non-reentrant checkpoint, as it also
does when the layer module cannot be found from the function transformers passes.

The layer's forward and its recomputation share one `fastlm.kernels.lora.reuse_casts` memo: fused LoRA casts
each adapter matrix to the compute dtype once per layer and step instead of twice, and the recomputation takes the
forward's x A^T products instead of recomputing them (these live from the layer's forward to its backward: the
casts 2 bytes per LoRA parameter, 84 MB over all layers at Llama-3.1-8B with r=16; the products 2 bytes x tokens
x the summed ranks, 29 MB there at batch 2 x 2048). The recomputation is marked as one, so a fused MLP whose output
only feeds the residual sum skips its down projection there.

Limits: backward through the same graph twice (retain_graph=True) raises; a layer must not modify its input in
place (checked), nor may anything else while the copy runs (decoder layers never do).
"""
import collections
import contextlib
import functools
import logging
import weakref
from typing import Optional

import torch
from torch import nn

from fastlm.kernels.lora import restore_saved, reuse_casts, take_saved
from fastlm.training.layer_graphs import LayerGraphs, graphs_enabled

logger = logging.getLogger("fastlm")


# Side-stream copies (offloads in forward, prefetches in backward) allowed to be unfinished at once. A layer input
# whose copy is pending stays allocated (record_stream), and a host running ahead of the GPU keeps one per layer:
# with CUDA-graphed layers (~0.1 ms of host time per layer against ~3 ms of GPU time at Llama-3.2-1B, batch 4) that
# was all 16 prefetched inputs, 512 MiB of reserved memory (bench/RESULTS.md, run 23). Waiting for the oldest
# copy keeps the host at most this many layers ahead, which still keeps the GPU fed (run 24: same step time).
MAX_COPIES_IN_FLIGHT = 2


class _CopyThrottle:
    """The events of the side-stream copies not known to be finished, oldest first (one per checkpoint function)."""

    def __init__(self):
        self.pending = collections.deque()

    def wait_for_room(self) -> None:
        while len(self.pending) >= MAX_COPIES_IN_FLIGHT:
            self.pending.popleft().synchronize()

    def add(self, event: "torch.cuda.Event") -> None:
        self.pending.append(event)


class _SavedInput:
    """One layer input, and the tensors the layer's forward pass saved for its recomputation (fastlm.kernels.lora's
    take_saved: the attention's output and log-sum-exp): pinned host copies (CUDA) or the tensors themselves (CPU);
    see the module docstring. x first, the saved tensors after it (`add`)."""

    def __init__(self, x: torch.Tensor, stream: Optional["torch.cuda.Stream"], previous, synchronize: bool,
                 throttle: _CopyThrottle):
        self.requires_grad = x.requires_grad
        self.stream = stream
        self.throttle = throttle
        self.previous = previous            # weakref to the entry saved just before this one, or None
        self.synchronize = synchronize
        self.host = []                      # per tensor: its pinned host copy (CUDA) or itself (CPU)
        self.device_copies = None           # the GPU tensors once prefetched, until taken
        self.fetched = None                 # CUDA event recorded after the copy back
        self.kept = None if stream is None else []  # on a GPU, the tensors themselves while this is the latest entry
        self.done = False
        self.add([x])

    def add(self, tensors) -> None:
        """Keep these tensors too (on a GPU: start their copies to host memory once the compute stream has made
        them). Before take() only."""
        tensors = [t.detach() for t in tensors]
        if self.stream is None or not tensors:
            self.host += tensors
            return
        device = tensors[0].device
        compute = torch.cuda.current_stream(device)
        hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        self.throttle.wait_for_room()
        self.stream.wait_stream(compute)    # the tensors have been written on the compute stream
        with torch.cuda.stream(self.stream):
            for host, tensor in zip(hosts, tensors):
                host.copy_(tensor, non_blocking=True)
            offloaded = torch.cuda.Event()
            offloaded.record(self.stream)
        self.throttle.add(offloaded)
        for tensor in tensors:
            tensor.record_stream(self.stream)  # its memory is not reused until the copy above has finished
        self.host += hosts
        if self.kept is not None:           # still the latest entry: these stay on the GPU too
            self.kept += tensors
        if self.synchronize:
            torch.cuda.synchronize(device)

    def release_kept(self) -> None:
        """Drop the GPU tensors themselves, once a later layer has saved its own (their pinned copies remain)."""
        self.kept = None

    def prefetch(self) -> None:
        """Start copying the tensors back to the GPU on the side stream (no-op on CPU, when done or started, or
        while the GPU tensors themselves are kept)."""
        if self.stream is None or self.done or self.device_copies is not None or self.kept is not None:
            return
        device = self.stream.device
        compute = torch.cuda.current_stream(device)
        self.throttle.wait_for_room()
        with torch.cuda.device(device):
            self.device_copies = [torch.empty(h.shape, dtype=h.dtype, device=device) for h in self.host]
        self.stream.wait_stream(compute)    # the buffers' memory may still be read by queued compute kernels
        with torch.cuda.stream(self.stream):
            for copy, host in zip(self.device_copies, self.host):
                copy.copy_(host, non_blocking=True)
            self.fetched = torch.cuda.Event()
            self.fetched.record(self.stream)
        self.throttle.add(self.fetched)
        for copy in self.device_copies:
            copy.record_stream(self.stream)
        if self.synchronize:
            torch.cuda.synchronize(device)

    def take(self) -> list:
        """[x, *saved tensors], usable on the current (compute) stream; starts the previous entry's prefetch. Once
        only."""
        if self.done:
            raise RuntimeError("Backward ran twice through a layer checkpointed with use_gradient_checkpointing="
                               "\"unsloth\" (retain_graph=True?); its saved input is gone. Use "
                               "use_gradient_checkpointing=True for repeated backward passes.")
        if self.stream is None:
            tensors = self.host
        else:
            self.prefetch()
            previous = self.previous() if self.previous is not None else None
            if previous is not None:
                previous.prefetch()
            if self.kept is not None:       # the last layer's: still on the GPU, nothing to copy back
                tensors = self.kept
            else:
                torch.cuda.current_stream(self.stream.device).wait_event(self.fetched)
                tensors = self.device_copies
        self.done, self.host, self.device_copies, self.previous, self.kept = True, None, None, None, None
        return tensors


class _RngState:
    """CPU and CUDA generator states at forward time, restored (and then undone) for the recomputation."""

    def __init__(self, cuda_devices):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}

    @contextlib.contextmanager
    def restored(self):
        outer_cpu = torch.get_rng_state()
        outer_cuda = {d: torch.cuda.get_rng_state(d) for d in self.cuda}
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)
        try:
            yield
        finally:
            torch.set_rng_state(outer_cpu)
            for device, state in outer_cuda.items():
                torch.cuda.set_rng_state(state, device)


def _autocast_state():
    """[(device_type, enabled, dtype)] for the CPU and, when present, CUDA."""
    types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]


class _OffloadedCheckpointFunction(torch.autograd.Function):
    """outputs = run(*args); args[0] is offloaded; grads for the tensor args and for `params` (the layer's)."""

    @staticmethod
    def forward(ctx, run, checkpointer, plan, n_args, *args_and_params):
        args, params = args_and_params[:n_args], args_and_params[n_args:]
        x = args[0]
        ctx.set_materialize_grads(False)
        ctx.run, ctx.n_args, ctx.params = run, n_args, params
        ctx.autocast = _autocast_state()
        ctx.saved = checkpointer.save(x)
        ctx.other_args = args[1:]
        ctx.casts = {}                      # fused LoRA's compute-dtype weight copies, for forward and recompute
        ctx.graph = None
        if plan is not None:                # a CUDA graph of this layer (fastlm/training/layer_graphs.py)
            ctx.graph, ctx.bound = plan
            ctx.follows = ctx.graph.follows(x)  # dx may then stay in the graphs' static buffer (LayerGraph.backward)
            outputs, saved = ctx.graph.forward(x, ctx.bound)
            ctx.saved.add(saved)
            ctx.generation = ctx.graph.generation
            ctx.rng = None                  # graphed layers draw no random numbers (no dropout)
            return outputs
        ctx.rng = _RngState(sorted({a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda}, key=str))
        version = x._version
        with reuse_casts(ctx.casts):
            outputs = run(*args)
        ctx.saved.add(take_saved(ctx.casts))
        if x._version != version:
            raise RuntimeError("The checkpointed layer modified its input in place; offloaded checkpointing "
                               "recomputes from the input as it was. Use use_gradient_checkpointing=True.")
        flat = outputs if isinstance(outputs, tuple) else (outputs,)
        if not all(o is None or isinstance(o, (torch.Tensor, int, float, bool)) for o in flat):
            raise TypeError(f"Offloaded checkpointing needs a layer returning a tensor or a tuple of tensors, got "
                            f"{type(outputs).__name__}. Use use_gradient_checkpointing=True for this model.")
        ctx.mark_non_differentiable(*[o for o in flat if isinstance(o, torch.Tensor) and not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, *saved = ctx.saved.take()
        if ctx.graph is not None and ctx.graph.generation == ctx.generation:
            dx, param_grads = ctx.graph.backward(x, ctx.bound, grad_outputs[0], static_dx=ctx.follows, saved=saved)
            ctx.run = ctx.other_args = ctx.graph = ctx.bound = None
            return (None, None, None, None, dx) + tuple(param_grads)
        args = (x.detach().requires_grad_(ctx.saved.requires_grad),) + tuple(
            a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in ctx.other_args)
        with contextlib.ExitStack() as stack:
            if ctx.rng is not None:
                stack.enter_context(ctx.rng.restored())
            stack.enter_context(torch.enable_grad())
            for device_type, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            restore_saved(ctx.casts, saved)
            stack.enter_context(reuse_casts(ctx.casts, recomputing=True))
            outputs = ctx.run(*args)
        # ctx.saved stays: a second backward gets take()'s clear error
        ctx.run = ctx.other_args = ctx.casts = ctx.graph = None
        flat = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(flat, grad_outputs)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        needs = ctx.needs_input_grad[4:]
        candidates = list(args) + list(ctx.params)
        wanted = [i for i, (t, need) in enumerate(zip(candidates, needs)) if need and isinstance(t, torch.Tensor)]
        grads = [None] * len(candidates)
        if pairs and wanted:
            found = torch.autograd.grad([o for o, _ in pairs], [candidates[i] for i in wanted],
                                        [g for _, g in pairs], allow_unused=True)
            for i, grad in zip(wanted, found):
                grads[i] = grad
        return (None, None, None, None) + tuple(grads)


def _layer_module(function) -> Optional[nn.Module]:
    """The module whose forward `function` runs: partial(forward, layer, ...) (transformers 5.24) or a partial of
    a bound layer.__call__ (older GradientCheckpointingLayer)."""
    while isinstance(function, functools.partial):
        for arg in function.args:
            if isinstance(arg, nn.Module):
                return arg
        function = function.func
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _bound_tensors_require_grad(function) -> bool:
    """Whether a tensor bound into `function` (partial args/keywords, nested in tuples, lists, dicts) needs grad."""
    def walk(value):
        if isinstance(value, torch.Tensor):
            return value.requires_grad
        if isinstance(value, (tuple, list)):
            return any(walk(v) for v in value)
        if isinstance(value, dict):
            return any(walk(v) for v in value.values())
        return False
    while isinstance(function, functools.partial):
        if walk(function.args) or walk(function.keywords):
            return True
        function = function.func
    return False


class OffloadedCheckpoint:
    """The checkpoint function for one model instance: `checkpoint(function, *args, **kwargs) -> outputs`.

    Installed through `model._set_gradient_checkpointing(gradient_checkpointing_func=...)`, it replaces
    torch.utils.checkpoint.checkpoint for that model's decoder layers only. Holds the side streams (one per CUDA
    device) and a weak reference to the latest saved input (to link each entry to its predecessor for prefetch).
    `synchronize=True` synchronizes the device after every copy (tests compare it against the overlapped run).
    """

    def __init__(self, synchronize: bool = False, cuda_graphs: Optional[bool] = None):
        self.synchronize = synchronize
        if cuda_graphs is None:
            cuda_graphs = graphs_enabled()
        self.graphs = LayerGraphs() if cuda_graphs else None
        self._streams = {}
        self._latest = None
        self._throttle = _CopyThrottle()
        self._fallback_logged = False

    def save(self, x: torch.Tensor) -> _SavedInput:
        stream = None
        if x.is_cuda:
            if x.device not in self._streams:
                self._streams[x.device] = torch.cuda.Stream(device=x.device)
            stream = self._streams[x.device]
        latest = self._latest() if self._latest is not None else None
        if latest is not None:
            latest.release_kept()
        previous = weakref.ref(latest) if latest is not None and not latest.done else None
        entry = _SavedInput(x, stream, previous, self.synchronize, self._throttle)
        self._latest = weakref.ref(entry)
        return entry

    def _fallback(self, function, args, why: str):
        if not self._fallback_logged:
            logger.info("fastlm: offloaded checkpointing falls back to torch's checkpoint: %s.", why)
            self._fallback_logged = True
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    def __call__(self, function, *args, **kwargs):
        if kwargs:
            function = functools.partial(function, **kwargs)
        if not torch.is_grad_enabled():
            return function(*args)
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return self._fallback(function, args, "the layer's first positional argument is not a float tensor")
        if _bound_tensors_require_grad(function):
            return self._fallback(function, args, "a keyword argument of the layer requires grad")
        layer = _layer_module(function)
        if layer is None:
            return self._fallback(function, args, "the checkpointed function is not a module's forward")
        params = [p for p in layer.parameters() if p.requires_grad]
        if not params and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function(*args)          # nothing in or behind this layer trains: no graph to keep
        plan = self.graphs.plan(layer, function, args, params) if self.graphs is not None else None
        return _OffloadedCheckpointFunction.apply(function, self, plan, len(args), *args, *params)
