"""What adding the LoRA term in a second GEMM costs, against folding it into the base GEMM's reduction.

    python3 bench/lora_fold.py --out $OUT

fastlm's fused LoRA (fastlm/kernels/lora.py) computes y = x W^T and then y += (x A^T)(s B)^T with a second,
rank-R GEMM that reads and writes all of y (M, N); in backward, dx = dy W and then dx += (dy s B) A the same way.
Folded, each is one GEMM over a reduction R longer:
    forward    y  = [x | x A^T] [W | s B]^T          (M, K+R) x (K+R, N)
    backward   dx = [dy | dy s B] [W ; A]            (M, N+R) x (N+R, K)
For each projection group of Llama-3.2-1B (M = 4 x 2048 tokens) and Llama-3.1-8B (M = 2 x 2048), bf16, LoRA r=16
on every projection (R = 48 for q/k/v, 32 for gate/up), this times: the current two GEMMs (q/k/v: three base GEMMs
and three rank-16 adds, as _project does), the folded GEMM alone (its operands ready), and the copy that builds
[x | x A^T] or [dy | dy s B] when no kernel can write them in place. Times: bench.common.time_ms medians.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import reported, save_rows, time_ms  # noqa: E402

SHAPES = {"1b": dict(m=8192, hidden=2048, kv=512, inter=8192), "8b": dict(m=4096, hidden=4096, kv=1024, inter=14336)}
RANK = 16


def groups(hidden: int, kv: int, inter: int) -> dict:
    """name -> (K, [N_i]) of each fused projection group."""
    return {"qkv": (hidden, [hidden, kv, kv]), "o": (hidden, [hidden]), "gate_up": (hidden, [inter, inter]),
            "down": (inter, [hidden])}


def forward_rows(shape: str, m: int, k: int, widths: list, name: str) -> dict:
    r, n = RANK * len(widths), sum(widths)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, xa = torch.randn(m, k, **bf16), torch.randn(m, r, **bf16)
    ws = [torch.randn(w, k, **bf16) * 0.02 for w in widths]
    b_bd = torch.randn(n, r, **bf16) * 0.02
    y_all = torch.empty(m, n, **bf16)

    def current():
        row = col = 0
        for w, width in zip(ws, widths):
            y = torch.mm(x, w.T, out=y_all[:, row:row + width])
            if len(widths) > 1 and name == "qkv":   # q, k, v: one rank-16 add each
                y.addmm_(xa[:, col:col + RANK], b_bd[row:row + width, col:col + RANK].T)
            row, col = row + width, col + RANK
        if name != "qkv":
            y_all.addmm_(xa, b_bd.T)

    xx = torch.cat([x, xa], dim=1)
    w_folded = torch.cat([torch.cat(ws), b_bd], dim=1)       # (N, K+R)
    ideal = lambda: torch.mm(xx, w_folded.T, out=y_all)  # noqa: E731
    build = lambda: torch.cat([x, xa], dim=1, out=xx)  # noqa: E731
    return _timed_row(y_all, current, ideal, build, shape=shape, group=name, pass_="forward", m=m, k=k, n=n, r=r)


def backward_rows(shape: str, m: int, k: int, widths: list, name: str) -> dict:
    r, n = RANK * len(widths), sum(widths)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    d_all, dyb = torch.randn(m, n, **bf16), torch.randn(m, r, **bf16)
    ws = [torch.randn(w, k, **bf16) * 0.02 for w in widths]
    a_all = torch.randn(r, k, **bf16) * 0.02
    dx = torch.empty(m, k, **bf16)

    def current():
        row = 0
        for i, w in enumerate(ws):
            part = d_all[:, row:row + w.shape[0]]
            torch.mm(part, w, out=dx) if i == 0 else dx.addmm_(part, w)
            row += w.shape[0]
        dx.addmm_(dyb, a_all)

    dd = torch.cat([d_all, dyb], dim=1)
    w_folded = torch.cat(ws + [a_all])                        # (N+R, K)
    ideal = lambda: torch.mm(dd, w_folded, out=dx)  # noqa: E731
    build = lambda: torch.cat([d_all, dyb], dim=1, out=dd)  # noqa: E731
    return _timed_row(dx, current, ideal, build, shape=shape, group=name, pass_="backward dx", m=m, k=k, n=n, r=r)


def _timed_row(out, current, ideal, build, **row) -> dict:
    """`row` with the times of the two ways (both write `out`) and of building the folded operand, and the folded
    result's largest difference from the current one, relative to the current output's largest entry."""
    current()
    expected = out.float().clone()
    ideal()
    error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
    return dict(row, current_ms=time_ms(current), folded_ms=time_ms(ideal), build_operand_ms=time_ms(build),
                folded_vs_current_rel_err=error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--shapes", default="1b,8b")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        for name, (k, widths) in groups(s["hidden"], s["kv"], s["inter"]).items():
            rows.append(reported(forward_rows(shape, s["m"], k, widths, name)))
            rows.append(reported(backward_rows(shape, s["m"], k, widths, name)))
            torch.cuda.empty_cache()
    save_rows(args.out, "lora_fold.json", rows)


if __name__ == "__main__":
    main()
