"""The least time a LoRA training step with gradient checkpointing can take on this GPU in bf16: its base GEMMs and
its attention, each timed alone at the step's shapes, nothing else (no norms, activations, loss, optimizer, NF4
dequantization, LoRA terms, launch gaps).

    python3 bench/gemm_floor.py --out $OUT

Per decoder layer, with the frozen base needing no weight gradient, the GEMMs a checkpointed step must run are:
the forward's q|k|v (one fused GEMM, the cheaper form), o, gate|up (fused) and down; the recomputation's q|k|v, o
and gate|up (down's output is not needed by the backward); the backward's input gradients through all four. Then
the lm_head forward and its input gradient. Attention: one causal forward and one backward per layer (cuDNN, as
fastlm runs it with the saved output). Each GEMM runs as the model runs it (`F.linear(x, W)` forward,
`dy @ W` backward, W of shape (out, in)) and is timed alone (median, L2 flushed: bench/common.time_ms).

The sum is a floor, not a prediction: a real step adds everything left out above. Issue 4's speed targets are
compared with it in bench/RESULTS.md (runs 89-).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import reported, save_rows, time_ms  # noqa: E402
from bench.saved_attention import measure as measure_attention  # noqa: E402
from bench.train_step import SHAPES  # noqa: E402

BATCH = {"1b": 4, "8b": 2}  # issue 4's batches; sequence length 2048
SEQ = 2048


def step_gemms(shape: str) -> list:
    """(name, count per step, rows M, in K, out N, kind): kind "forward" is F.linear(x (M, K), W (N, K)) -> (M, N);
    "backward" is dy (M, N) @ W (N, K) -> (M, K), the input gradient."""
    config = SHAPES[shape]
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    m = BATCH[shape] * SEQ
    return [
        ("qkv forward + recomputation", 2 * layers, m, h, h + 2 * kv, "forward"),
        ("o forward + recomputation", 2 * layers, m, h, h, "forward"),
        ("gate|up forward + recomputation", 2 * layers, m, h, 2 * i, "forward"),
        ("down forward", layers, m, i, h, "forward"),
        ("qkv input gradient", layers, m, h, h + 2 * kv, "backward"),
        ("o input gradient", layers, m, h, h, "backward"),
        ("gate|up input gradient", layers, m, h, 2 * i, "backward"),
        ("down input gradient", layers, m, i, h, "backward"),
        ("lm_head forward", 1, m, h, config["vocab_size"], "forward"),
        ("lm_head input gradient", 1, m, h, config["vocab_size"], "backward"),
    ]


def time_gemm(m: int, k: int, n: int, kind: str) -> float:
    """Median ms of one bf16 GEMM as the model runs it (see step_gemms)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k ** -0.5
    if kind == "forward":
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        return time_ms(lambda: F.linear(x, weight))
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    return time_ms(lambda: dy @ weight)


def floor(shape: str) -> dict:
    rows, gemm_ms, flops = [], 0.0, 0.0
    for name, count, m, k, n, kind in step_gemms(shape):
        ms = time_gemm(m, k, n, kind)
        rows.append(reported(dict(shape=shape, gemm=name, m=m, k=k, n=n, count=count, ms_each=ms,
                                  tflops=2 * m * k * n / (ms * 1e-3) / 1e12)))
        gemm_ms += count * ms
        flops += count * 2 * m * k * n
        torch.cuda.empty_cache()
    attention = measure_attention(shape)
    layers = SHAPES[shape]["num_hidden_layers"]
    attention_ms = layers * (attention["lse_forward_us"] + attention["backward_us"]) / 1000
    summary = reported(dict(shape=shape, batch=BATCH[shape], seq=SEQ, gemm_ms=gemm_ms,
                            gemm_tflops=flops / (gemm_ms * 1e-3) / 1e12, gemm_tflop=flops / 1e12,
                            attention_forward_us=attention["lse_forward_us"],
                            attention_backward_us=attention["backward_us"], attention_ms=attention_ms,
                            floor_ms=gemm_ms + attention_ms))
    return dict(summary=summary, gemms=rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    square = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    square_ms = time_ms(lambda: square @ square)  # the rate behind train_step.PEAK_BF16_TFLOPS
    reported(dict(reference="8192^3 bf16 GEMM", ms=square_ms, tflops=2 * 8192 ** 3 / (square_ms * 1e-3) / 1e12))
    del square
    save_rows(args.out, "gemm_floor.json", [floor(shape) for shape in ("1b", "8b")])


if __name__ == "__main__":
    main()
