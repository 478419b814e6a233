"""What an output layer kept in pinned host memory costs on the H200: the measurements behind offload_lm_head.

    python3 bench/host_linear.py --out $OUT

For Llama-3.2-1B's and Llama-3.1-8B's lm_head shapes (128256 x 2048 / x 4096, bf16):
- F.linear of 1 row (a decode step) and of a batch's rows through fastlm's host_mapped alias (cuBLAS reading the
  weight over PCIe in place) against the device weight: equal?, ms, GB/s of weight read;
- copies of vocabulary blocks from pinned host memory into a device buffer, by block size: GB/s alone, and while
  the compute stream runs the block's logits GEMM (the streamed loss's overlap);
- whether this torch has bf16 x bf16 -> fp32 matmuls (torch.mm / torch.addmm with out_dtype) and what they cost
  against the bf16-output matmul.
Times are bench.common.time_ms's medians.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import gbps, reported, save_rows, time_ms  # noqa: E402
from fastlm.loading.host_weights import host_mapped  # noqa: E402

VOCAB = 128256


def linear_rows(hidden: int, tokens: int) -> list:
    weight = torch.randn(VOCAB, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
    mapped = host_mapped(weight)
    rows = []
    for n in (1, tokens):
        x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
        expected = F.linear(x, weight)
        got = F.linear(x, mapped)
        row = dict(what="F.linear", hidden=hidden, rows=n, equal=bool(torch.equal(got, expected)),
                   max_abs_diff=float((got.float() - expected.float()).abs().max()),
                   device_ms=time_ms(lambda: F.linear(x, weight)), mapped_ms=time_ms(lambda: F.linear(x, mapped)))
        row["mapped_weight_gb_per_s"] = gbps(weight.numel() * 2, row["mapped_ms"])
        rows.append(row)
    return rows


def block_copies(hidden: int, tokens: int) -> list:
    host = torch.randn(VOCAB, hidden, dtype=torch.bfloat16).pin_memory()
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    rows = []
    for block_mib in (8, 16, 32, 64, 128):
        block = block_mib * 2**20 // (hidden * 2)
        buffer = torch.empty(block, hidden, device="cuda", dtype=torch.bfloat16)
        source = host[:block]
        copy_ms = time_ms(lambda: buffer.copy_(source, non_blocking=True))
        gemm_ms = time_ms(lambda: x @ buffer.T)

        def both():
            with torch.cuda.stream(side):
                buffer.copy_(source, non_blocking=True)
            x @ buffer.T
            torch.cuda.current_stream().wait_stream(side)
        rows.append(dict(what="block copy", hidden=hidden, tokens=tokens, block_rows=block, block_mib=block_mib,
                         copy_ms=copy_ms, copy_gb_per_s=gbps(block * hidden * 2, copy_ms), gemm_ms=gemm_ms,
                         copy_with_gemm_ms=time_ms(both)))
    return rows


def fp32_output_matmuls(hidden: int, tokens: int, block: int) -> list:
    p = torch.rand(tokens, block, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(block, hidden, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(tokens, hidden, device="cuda")
    row = dict(what="fp32-output matmul", hidden=hidden, tokens=tokens, block=block,
               bf16_ms=time_ms(lambda: p @ w), bf16_then_add_ms=time_ms(lambda: acc.add_(p @ w)))
    reference = p.float() @ w.float()
    for name, fn in (("mm_out_dtype", lambda: torch.mm(p, w, out_dtype=torch.float32)),
                     ("addmm_out_dtype", lambda: torch.addmm(acc, p, w, out_dtype=torch.float32)),
                     ("addmm_out_dtype_into_acc", lambda: torch.addmm(acc, p, w, out_dtype=torch.float32, out=acc))):
        try:
            acc.zero_()
            got = fn()
            row[name + "_max_rel_err"] = float((got - reference).abs().max() / reference.abs().max())
            row[name + "_ms"] = time_ms(fn)
        except Exception as error:  # an unsupported overload is a result here
            row[name + "_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    row["bf16_max_rel_err"] = float(((p @ w).float() - reference).abs().max() / reference.abs().max())
    return [row]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    for hidden, tokens in ((2048, 8192), (4096, 4096)):
        for part in (linear_rows(hidden, tokens), block_copies(hidden, tokens),
                     fp32_output_matmuls(hidden, tokens, 8192)):
            rows += [reported(row) for row in part]
        torch.cuda.empty_cache()
    save_rows(args.out, "host_linear.json", rows)


if __name__ == "__main__":
    main()
