"""Copying a 16-bit weight into the columns of a wider workspace (fused LoRA's folded gate | up, lora._copy_into).

    python3 bench/strided_copy.py --out $OUT

The folded GEMM of gate | up (fastlm/kernels/lora.py `_folded_weight`) needs [W_g; W_u | s B] (2I, H + R); a 16-bit
W is copied into the first H columns, rows H + R apart, twice per layer and step (the blocked first pass and the
backward). torch copies into a destination that is not contiguous element by element; viewed as 8-byte words
(`_copy_into`), the same bytes move in a quarter of the elements. For Llama-3.2-1B's and Llama-3.1-8B's gate weight
(I x H bf16, R = 32) this times: torch's copy_ of bf16 elements, of int32 and of int64 words, and a contiguous
copy of the same bytes (the ceiling). GB/s counts bytes read + written. Times: bench.common.time_ms medians.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import gbps, reported, save_rows, time_ms  # noqa: E402

SHAPES = {"1b": (8192, 2048), "8b": (14336, 4096)}  # (I, H) of the gate weight
RANK = 32  # gate's and up's r = 16 side by side


def rows_for(shape: str) -> list:
    inter, hidden = SHAPES[shape]
    weight = torch.randn(inter, hidden, device="cuda", dtype=torch.bfloat16)
    wide = torch.empty(inter, hidden + RANK, device="cuda", dtype=torch.bfloat16)
    out, flat = wide[:, :hidden], torch.empty_like(weight)
    moved = 2 * weight.numel() * weight.element_size()
    variants = {
        "copy_ bf16 elements": lambda: out.copy_(weight),
        "copy_ int32 words": lambda: out.view(torch.int32).copy_(weight.view(torch.int32)),
        "copy_ int64 words (_copy_into)": lambda: out.view(torch.int64).copy_(weight.view(torch.int64)),
        "contiguous copy (ceiling)": lambda: flat.copy_(weight),
    }
    rows = []
    for name, fn in variants.items():
        fn()
        if name != "contiguous copy (ceiling)":
            assert torch.equal(out, weight), name
        ms = time_ms(fn)
        rows.append(dict(shape=shape, weight=f"{inter}x{hidden} into {hidden + RANK} columns", variant=name,
                         ms=round(ms, 4), gbps=round(gbps(moved, ms), 1)))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        rows += rows_for(shape)
        for row in rows[-4:]:
            reported(row)
    save_rows(args.out, "strided_copy.json", rows)


if __name__ == "__main__":
    main()
