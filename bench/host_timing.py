"""Host time of fastlm's per-layer work in a training step, measured without the profiler (whose cost per op inflates
exactly this kind of many-small-call code): time.perf_counter around offloaded checkpointing's layer call (forward:
the graph plan, the offload bookkeeping, the replay's launch), the layer's backward, the layer graphs' plan and its
_layer_state walk, and the copy throttle's waits (the host blocked on a copy event: time the GPU is busy, not the
host). Whether the host keeps up with 2.2 ms layers at Llama-3.2-1B batch 4 is what bench/RESULTS.md run 112's
profile could not say.

    timing = HostTiming.install()   # patches this process's fastlm classes (a measurement, not a product path)
    timing.reset()                  # after the warm-up steps
    timing.per_step(steps)          # {label: {"ms_per_step", "calls_per_step", "us_per_call"}}
"""
import collections
import functools
import time


_INSTALLED = None


class HostTiming:
    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()

    def _wrap(self, owner, name: str, label: str, static: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
        setattr(owner, name, staticmethod(timed) if static else timed)

    @classmethod
    def install(cls) -> "HostTiming":
        """The process's HostTiming, patched in at the first call (later calls return it: wrapping twice would
        count twice)."""
        global _INSTALLED
        if _INSTALLED is not None:
            return _INSTALLED
        from fastlm.training import layer_graphs, offload
        timing = _INSTALLED = cls()
        timing._wrap(offload.OffloadedCheckpoint, "__call__", "layer call (forward)")
        timing._wrap(offload._OffloadedCheckpointFunction, "backward", "layer backward", static=True)
        timing._wrap(layer_graphs.LayerGraphs, "plan", "graph plan")
        timing._wrap(layer_graphs, "_layer_state", "_layer_state walk")
        timing._wrap(offload._CopyThrottle, "wait_for_room", "copy throttle wait")
        return timing

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def per_step(self, steps: int) -> dict:
        return {label: dict(ms_per_step=round(1000 * s / steps, 2), calls_per_step=round(self.calls[label] / steps, 1),
                            us_per_call=round(1e6 * s / max(self.calls[label], 1), 1))
                for label, s in sorted(self.seconds.items())}
