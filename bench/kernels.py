"""Kernel benchmark on the H200: every op in bench/kernel_ops/, against eager PyTorch, torch.compile
of the reference and Liger-Kernel where installed, all in one run.

    python3 bench/kernels.py --out $OUT [--ops rms_norm,swiglu]

Each module in bench/kernel_ops/ has `run(record)`; it calls
`record(op, variant, ms, bytes_moved=None, peak_mib=None, note="")` once per measured variant.
Writes kernels.json and kernels.md (a table with GB/s and % of the measured copy bandwidth).
"""
import argparse
import importlib
import json
import os
import pkgutil
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_bandwidth_gbps, gbps  # noqa: E402
import bench.kernel_ops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--ops", default="", help="comma-separated module names; default all")
    args = parser.parse_args()
    names = [m.name for m in pkgutil.iter_modules(bench.kernel_ops.__path__)]
    if args.ops:
        names = [n for n in names if n in args.ops.split(",")]

    copy_bw = copy_bandwidth_gbps()
    rows = []

    def record(op, variant, ms, bytes_moved=None, peak_mib=None, note=""):
        row = dict(op=op, variant=variant, ms=round(ms, 4), note=note)
        if bytes_moved is not None:
            row["gbps"] = round(gbps(bytes_moved, ms), 1)
            row["pct_copy"] = round(100 * row["gbps"] / copy_bw, 1)
        if peak_mib is not None:
            row["peak_mib"] = round(peak_mib, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name in names:
        module = importlib.import_module(f"bench.kernel_ops.{name}")
        try:
            module.run(record)
        except Exception as exc:  # keep measuring the other ops; the failure is in the report
            record(name, "FAILED", float("nan"), note=repr(exc)[:300])
        torch.cuda.empty_cache()

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_gbps=round(copy_bw, 1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"{meta}", "", "| op | variant | ms | GB/s | % copy | peak MiB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['variant']} | {r['ms']} | {r.get('gbps', '')} | {r.get('pct_copy', '')} "
                     f"| {r.get('peak_mib', '')} | {r['note']} |")
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
