"""Where a training step's time and memory go (issue 4's "a profile"), on the H200.

    python3 bench/profile_step.py --out $OUT --shape 8b --variant qlora --batch 2 [--impls fastlm,hf]

Same models, batch and settings as bench/train_step.py. Per implementation: 2 warm-up steps, then one step
measured by phase (memory allocated before and peak during forward, backward and optimizer step), then 2 steps
under torch.profiler. Writes profile_<shape>_<variant>.json with, per implementation: GPU kernel time per step
by category and the top kernels, how busy the GPU was (kernel time / wall time), kernel launches per step, and
the memory phases; prints a side-by-side summary.
"""
import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import (add_ablation_arguments, add_setting_arguments, apply_ablations,  # noqa: E402
                              import_fastlm_first, load, make_checkpoint)

# Kernel name fragments -> category, first match wins (lower-case). cuBLAS on Hopper names its GEMMs nvjet_* or
# sm90_xmma_*; SDPA's flash backend is pytorch_flash::flash_*; Triton kernels keep their Python names.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk", "cublas")),
    ("nf4 dequant", ("nf4", "dequant")),
    ("rms/layer norm", ("rms_norm", "layer_norm", "layernorm", "sum_partials")),
    ("rope", ("rope", "rotary")),
    ("swiglu/geglu", ("swiglu", "geglu", "silu", "gelu")),
    ("cross-entropy", ("cross_entropy", "_ce_", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("copy/cast", ("copy", "memcpy", "cat", "fill", "memset")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized")),
)


def category(name: str) -> str:
    low = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return label
    return "other"


def step(model, ids, optimizer):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _busy_and_gaps(kernels) -> tuple:
    """(busy us, [(gap us, gap start, kernel before, kernel after)]) of the union of compute kernels' intervals.
    kernels: (start us, end us, name, the kernel as the caller has it); copies and memsets (by name) are left out:
    offloaded checkpointing's copies run beside compute on a side stream. "Before" is the kernel that ended last."""
    kernels = sorted((k for k in kernels if not k[2].lower().startswith(("memcpy", "memset"))), key=lambda k: k[0])
    if not kernels:
        return 0.0, []
    busy, gaps = 0.0, []
    start, end, _, last = kernels[0]
    for next_start, next_end, _, kernel in kernels[1:]:
        if next_start > end:
            busy += end - start
            gaps.append((next_start - end, end, last, kernel))
            start = next_start
        if next_end > end:
            end, last = next_end, kernel
    return busy + end - start, gaps


def idle_gaps(device_events, wall_ms: float, profiled_steps: int, top: int = 12) -> dict:
    """When no compute kernel ran (_busy_and_gaps): the idle time per step, and the longest gaps between kernels,
    each with the kernels before and after it (where in the step the GPU waited)."""
    busy, found = _busy_and_gaps((e.time_range.start, e.time_range.end, e.name, e.name) for e in device_events)
    if not found and not busy:
        return {}
    gaps = sorted(((us, after, before) for us, _, after, before in found), key=lambda g: -g[0])
    # Idle ms per step in gaps of each size: many short ones are launch gaps between kernels (inside CUDA graphs
    # too), a few long ones are waits (the host, a copy, a sync).
    edges = (2, 5, 20, 100, 1000)
    labels = [f"<{edge}us" for edge in edges] + [f">={edges[-1]}us"]
    histogram = dict.fromkeys(labels, 0.0)
    for us, _, _ in gaps:
        histogram[labels[sum(us >= edge for edge in edges)]] += us / 1000 / profiled_steps
    # The waits of 0.1-1 ms (the host behind the GPU for a moment: a sync, a launch-heavy stretch) summed by the
    # pair of kernels around them, so that a wait repeated in every layer or step shows up as one place.
    places = {}
    for us, after, before in gaps:
        if 100 <= us < 1000:
            key = (after[:60], before[:60])
            total, count = places.get(key, (0.0, 0))
            places[key] = (total + us, count + 1)
    waits = sorted(places.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(compute_busy_ms=round(busy / 1000 / profiled_steps, 1),
                compute_idle_ms=round(wall_ms - busy / 1000 / profiled_steps, 1),
                gap_count_per_step=round(len(gaps) / profiled_steps),
                idle_ms_by_gap={k: round(v, 2) for k, v in histogram.items()},
                longest_gaps=[dict(us=round(us, 1), after=a[:70], before=b[:70]) for us, a, b in gaps[:top]],
                waits_by_place=[dict(ms_per_step=round(total / 1000 / profiled_steps, 2),
                                     per_step=round(count / profiled_steps, 1), after=after, before=before)
                                for (after, before), (total, count) in waits])


def gap_causes(trace_path: str, profiled_steps: int, top: int = 16, min_us: float = 100.0) -> dict:
    """Why the GPU waited, from the profiler's chrome trace: for each of the `top` longest gaps between compute
    kernels (_busy_and_gaps, as idle_gaps) of at least min_us, when the host launched the kernel
    that ended it and what the host was doing meanwhile.

    Per gap: us (its length), after / before (the kernels around it), launch_us (when the host's launch call of the
    kernel after it, matched by correlation id, started, from the gap's start: near the gap's length, the GPU waited
    for the host; negative, the kernel was queued before the gap began and the GPU waited for something else, a
    stream or event wait), launched_in (the host ops enclosing that launch, outermost first), host_busy (the host ops
    and runtime calls overlapping the gap on the launching thread, longest overlap first, with their overlap in us).
    Also the gaps' total per step by whether the host was late (launch_us > 0.5 x us), not late, or unknown (no
    launch call found for the kernel)."""
    with open(trace_path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    launch_calls = ("cuda_runtime", "cuda_driver")  # cuBLAS launches through the driver API
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") in launch_calls and "correlation" in e.get("args", {})}
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function") + launch_calls]
    _, gaps = _busy_and_gaps((e["ts"], e["ts"] + e["dur"], e["name"], e) for e in events if e.get("cat") == "kernel")
    gaps = [gap for gap in gaps if gap[0] >= min_us]
    late_ms = waited_ms = unknown_ms = 0.0
    rows = []
    for us, start, after, before in sorted(gaps, key=lambda g: -g[0]):
        launch = runtime.get(before.get("args", {}).get("correlation"))
        launch_us = None if launch is None else launch["ts"] - start
        if launch_us is None:
            unknown_ms += us / 1000 / profiled_steps
        elif launch_us > 0.5 * us:
            late_ms += us / 1000 / profiled_steps
        else:
            waited_ms += us / 1000 / profiled_steps
        if len(rows) >= top:
            continue
        thread = None if launch is None else launch["tid"]
        enclosing = [] if launch is None else sorted(
            (h for h in host if h["tid"] == thread and h["cat"] not in launch_calls
             and h["ts"] <= launch["ts"] <= h["ts"] + h["dur"]),
            key=lambda h: (h["ts"], -h["dur"]))
        busy = []
        for h in host:
            if thread is not None and h["tid"] != thread:
                continue
            overlap = min(h["ts"] + h["dur"], start + us) - max(h["ts"], start)
            if overlap > 0.2 * us and h["dur"] < 50 * us:  # leave out the whole-step ranges
                busy.append((overlap, h["name"]))
        busy.sort(key=lambda b: -b[0])
        rows.append(dict(us=round(us, 1), after=after["name"][:70], before=before["name"][:70],
                         launch_us=None if launch_us is None else round(launch_us, 1),
                         launched_in=[h["name"][:60] for h in enclosing][-6:],
                         host_busy=[f"{name[:60]} {overlap:.0f}" for overlap, name in busy[:8]]))
    return dict(gaps_over_min_per_step=round(len(gaps) / profiled_steps, 1),
                host_late_ms_per_step=round(late_ms, 2), gpu_waited_ms_per_step=round(waited_ms, 2),
                unknown_ms_per_step=round(unknown_ms, 2), gaps=rows)


def memory_phases(model, ids, optimizer) -> dict:
    """GiB allocated before, and peak during, each phase of one step."""
    gib = 2.0 ** 30
    phases = {}

    def measure(name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        phases[name] = dict(before=round(before / gib, 3), peak=round(torch.cuda.max_memory_allocated() / gib, 3))
        return out

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = measure("forward", lambda: model(input_ids=ids, labels=ids).loss)
    measure("backward", loss.backward)
    measure("optimizer", optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    phases["after_step"] = round(torch.cuda.memory_allocated() / gib, 3)
    return phases


def timeline(device_events, profiled_steps: int) -> list:
    """The last profiled step's GPU kernels in start order: [start us from the step's first kernel, duration us,
    gap us since the previous kernel ended, name (90 chars)]; copies and memsets included (they are kernels too)."""
    events = sorted(device_events, key=lambda e: e.time_range.start)
    per_step = len(events) // profiled_steps
    last = events[-per_step:]
    rows, t0, end = [], last[0].time_range.start, last[0].time_range.start
    for e in last:
        start, stop = e.time_range.start, e.time_range.end
        rows.append([round(start - t0, 1), round(stop - start, 1), round(start - end, 1), e.name[:90]])
        end = max(end, stop)
    return rows


def profile(impl, variant, path, batch, seq, profiled_steps=2, with_timeline=False, trace_dir=None) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = load(variant, path, impl == "fastlm")
    model.train()
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    static = torch.cuda.memory_allocated() / 2**30
    ids = torch.randint(3, model.config.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(0)).cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        step(model, ids, optimizer)
    phases = memory_phases(model, ids, optimizer)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(profiled_steps):
            step(model, ids, optimizer)
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - start) / profiled_steps
    kernels = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time_total / 1000 / profiled_steps  # ms per step
            kernels[event.name][1] += 1
    gaps = idle_gaps([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA], wall_ms,
                     profiled_steps)
    by_category = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_category[category(name)] += ms
    gpu_ms = sum(by_category.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    host_ops = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                      key=lambda e: -e.self_cpu_time_total)[:30]
    result = dict(impl=impl, wall_ms_profiled=round(wall_ms, 1), gpu_kernel_ms=round(gpu_ms, 1),
                  gpu_busy=round(gpu_ms / wall_ms, 3),
                  launches_per_step=sum(c for _, c in kernels.values()) // profiled_steps, **gaps,
                  by_category={k: round(v, 2) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
                  top_kernels=[dict(name=n[:120], ms=round(ms, 3), calls=c // profiled_steps,
                                    category=category(n)) for n, (ms, c) in top],
                  host_ops=[dict(name=e.key[:100], self_cpu_ms=round(e.self_cpu_time_total / 1000 / profiled_steps, 2),
                                 calls=e.count // profiled_steps) for e in host_ops],
                  memory_gib=dict(load_peak=round(load_peak, 3), static_after_load=round(static, 3), **phases))
    if trace_dir is not None:
        trace = os.path.join(trace_dir, f"trace_{impl}.json")
        prof.export_chrome_trace(trace)
        result["gap_causes"] = gap_causes(trace, profiled_steps)
        os.remove(trace)  # tens of MB per step
    if with_timeline:
        result["timeline"] = timeline([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                                      profiled_steps)
    del model, optimizer, prof
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser, shape="8b", batch=2)
    parser.add_argument("--variant", default="qlora")
    parser.add_argument("--impls", default="fastlm,hf")
    parser.add_argument("--timeline", action="store_true", help="also write one step's kernels in order")
    parser.add_argument("--gap-causes", action="store_true", help="also write, for the longest GPU gaps, when the "
                        "host launched the kernel after each and what it was doing (gap_causes)")
    add_ablation_arguments(parser)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    import_fastlm_first(args.impls.split(","))
    ablations = apply_ablations(args)
    path = make_checkpoint(args.shape)
    results = []
    for impl in args.impls.split(","):
        try:
            results.append(profile(impl, args.variant, path, args.batch, args.seq, with_timeline=args.timeline,
                                   trace_dir=args.out if args.gap_causes else None))
        except Exception as exc:
            results.append(dict(impl=impl, error=repr(exc)[:600]))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("top_kernels", "host_ops", "longest_gaps",
                                                                            "timeline", "gap_causes")}), flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape, variant=args.variant,
                batch=args.batch, seq=args.seq, ablations=ablations)
    os.makedirs(args.out, exist_ok=True)
    name = "_".join(["profile", args.shape, args.variant] + ablations)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    for r in results:
        for k in r.get("top_kernels", [])[:15]:
            print(f"{r['impl']:7s} {k['ms']:8.2f} ms {k['calls']:5d}x {k['category']:14s} {k['name'][:90]}")
        for g in r.get("longest_gaps", []):
            print(f"{r['impl']:7s} idle {g['us']:8.1f} us after {g['after'][:60]} / before {g['before'][:60]}")
        causes = r.get("gap_causes", {})
        if causes:
            print(f"{r['impl']:7s} gaps >= 100 us: host late {causes['host_late_ms_per_step']} ms/step, GPU waited "
                  f"otherwise {causes['gpu_waited_ms_per_step']}, launch not found {causes['unknown_ms_per_step']}")
        for g in causes.get("gaps", []):
            print(f"{r['impl']:7s} gap {g['us']:8.1f} us launch at {g['launch_us']} us in {g['launched_in'][-3:]}; "
                  f"host: {g['host_busy'][:4]}")
        for k in r.get("host_ops", [])[:12]:
            print(f"{r['impl']:7s} host {k['self_cpu_ms']:8.2f} ms {k['calls']:5d}x {k['name'][:90]}")


if __name__ == "__main__":
    main()
