"""One module per op; each has `run(record)` (see bench/kernels.py). Shared here: `gpu_ms`."""
import torch

from bench.common import time_ms


def gpu_ms(fn, n: int = 10) -> float:
    """GPU time of one `fn()` in ms, without host overhead: n calls captured into one CUDA graph, whose
    replays are timed like everything else (median of do_bench, L2 flushed before each replay).

    Why (H200, 2026-11-28): around fwd+bwd of a norm (~0.18 ms of GPU work) do_bench read 0.45-0.95 ms for
    every implementation, Liger and torch.compile included: the device machine's CPU needs ~350 us per call
    for the Python, ATen and autograd work, so that figure measures the host. Use n=1 where the inputs fit
    in L2 (60 MB) and later calls would find them there."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compilation, allocator) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    ms = time_ms(graph.replay) / n
    del graph
    torch.cuda.empty_cache()
    return ms
