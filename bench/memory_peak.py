"""Where the training step's peak GPU memory goes: one fastlm (or HF + PEFT) step of bench/train_step.py's setting
recorded with torch.cuda.memory._record_memory_history, and the tensors alive at the peak listed by the frame that
allocated them (the innermost frame in fastlm, transformers or peft).

    python3 bench/memory_peak.py --out $OUT [--shape 1b] [--variant qlora] [--batch 4] [--impl fastlm] [--warmup 2]
"""
import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profile_step import step  # noqa: E402
from bench.train_step import (add_setting_arguments, allocator_settings, import_fastlm_first, load,  # noqa: E402
                              make_checkpoint)


def live_at_peak(snapshot) -> tuple:
    """(peak bytes, [(bytes, frame, size)] of the blocks alive at the peak) from the allocation trace."""
    events = [e for trace in snapshot["device_traces"] for e in trace if e["action"] in ("alloc", "free_completed")]
    live, total, peak, at_peak = {}, 0, -1, {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > peak:
            peak, at_peak = total, dict(live)
    rows = []
    for e in at_peak.values():
        frames = e.get("frames", [])
        ours = next((f for f in frames if any(k in f["filename"] for k in ("fastlm", "transformers", "peft/"))), None)
        where = f"{os.path.basename(ours['filename'])}:{ours['line']} {ours['name']}" if ours else "?"
        rows.append((e["size"], where))
    return peak, rows


def segment_summary(snapshot) -> list:
    """Reserved memory at the end of the step by (memory pool, stream): segments, reserved and allocated MiB. Pool
    (0, 0) is the caching allocator's own; any other is a CUDA graph's private pool (fastlm's layer graphs)."""
    groups = collections.defaultdict(lambda: [0, 0, 0])
    for segment in snapshot["segments"]:
        key = (str(tuple(segment.get("segment_pool_id", (0, 0)))), hex(segment.get("stream", 0)))
        groups[key][0] += 1
        groups[key][1] += segment["total_size"]
        groups[key][2] += segment["allocated_size"]
    return [dict(pool=pool, stream=stream, segments=n, reserved_mib=round(total / 2**20, 1),
                 allocated_mib=round(allocated / 2**20, 1)) for (pool, stream), (n, total, allocated) in groups.items()]


def main():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    parser.add_argument("--variant", default="qlora")
    parser.add_argument("--impl", default="fastlm")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untraced steps first (1: the traced step is the one where fastlm captures its graphs)")
    args = parser.parse_args()
    import_fastlm_first([args.impl])
    model = load(args.variant, make_checkpoint(args.shape), args.impl == "fastlm")
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(args.warmup):
        step(model, ids, optimizer)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=400000, stacks="python")
    step(model, ids, optimizer)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, rows = live_at_peak(snapshot)
    by_site = collections.Counter()
    for size, where in rows:
        by_site[where] += size
    result = dict(impl=args.impl, shape=args.shape, variant=args.variant, batch=args.batch,
                  cuda_graphs=os.environ.get("FASTLM_CUDA_GRAPHS", "1"), warmup=args.warmup,
                  alloc_conf=allocator_settings(),
                  allocated_before_step_gib=round(base / 2**30, 3),
                  max_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                  max_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                  segments=segment_summary(snapshot),
                  traced_peak_above_start_gib=round(peak / 2**30, 3),
                  at_peak_mib=[(round(size / 2**20, 1), where) for where, size in by_site.most_common(25)])
    print(json.dumps(result, indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"memory_peak_{args.shape}_{args.variant}_{args.impl}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
