"""Timing and reporting shared by the benchmarks (run on the H200; see bench/RESULTS.md).

time_ms: median of CUDA-event timings after warm-up (triton.testing.do_bench).
gbps: bytes that must move / time.
reported, save_rows: one result row printed, all rows written as JSON.
"""
import json
import os

import torch
import triton


def time_ms(fn, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median milliseconds of `fn()` on the current CUDA device."""
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def gbps(bytes_moved: int, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def peak_mib(fn) -> float:
    """Peak extra CUDA memory (MiB) allocated while `fn()` runs, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbps(n_bytes: int = 2 * 2**30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written over time)."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return gbps(2 * n_bytes, ms)


def reported(row: dict) -> dict:
    """`row` with its floats rounded to 4 decimals, printed as one JSON line (the device call's output shows it)."""
    row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(json.dumps(row), flush=True)
    return row


def save_rows(out_dir: str, file_name: str, rows: list) -> None:
    """Write {gpu, torch, rows} as JSON to out_dir/file_name (bench/results keeps such files per run)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, file_name), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
