"""The fused loss with the lm_head on the GPU (chunked) against the lm_head streamed from pinned host memory
(offload_lm_head), forward + backward, on the H200.

    python3 bench/streamed_loss.py --out $OUT

Llama-3.1-8B's lm_head (128256 x 4096 bf16) with 2 x 2048 rows and Llama-3.2-1B's width (128256 x 2048) with 4 x 2048
rows, every row labelled: ms per loss + backward (bench.common.time_ms median), the weight bytes moved over PCIe per
call / time (GB/s) for the streamed one, the extra device memory at its peak (peak_mib), and how far the streamed
loss and grad_hidden are from the chunked ones; the streamed one for weight blocks of 8 to 64 MiB (BLOCK_BYTES).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import gbps, peak_mib, reported, save_rows, time_ms  # noqa: E402
from fastlm.kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402

VOCAB = 128256


def measure(hidden_size: int, rows: int) -> list:
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(rows, hidden_size, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(VOCAB, hidden_size, device="cuda", generator=generator) / hidden_size**0.5).bfloat16()
    labels = torch.randint(0, VOCAB, (rows,), device="cuda", generator=generator)
    host = weight.cpu().pin_memory()

    def step(**streamed):
        loss = fused_linear_cross_entropy(hidden, weight, labels, **streamed)
        (grad,) = torch.autograd.grad(loss, hidden)
        return loss, grad

    loss, grad = step()
    results = [dict(hidden=hidden_size, rows=rows, schedule="chunked (device weight)", ms=time_ms(step),
                    peak_mib=peak_mib(step))]
    for block_mib in (8, 16, 32, 64):
        kwargs = dict(host_weight=host, chunk_bytes=block_mib * 2**20)
        s_loss, s_grad = step(**kwargs)
        ms = time_ms(lambda: step(**kwargs))
        results.append(dict(hidden=hidden_size, rows=rows, schedule="streamed", block_mib=block_mib, ms=ms,
                            pcie_gb_per_s=gbps(VOCAB * hidden_size * 2, ms), peak_mib=peak_mib(lambda: step(**kwargs)),
                            loss_rel_diff=float((s_loss - loss).detach().abs() / loss.abs()),
                            grad_max_diff_over_max=float((s_grad.float() - grad.float()).abs().max()
                                                         / grad.float().abs().max())))
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = []
    for hidden_size, n in ((4096, 4096), (2048, 8192)):
        rows += [reported(row) for row in measure(hidden_size, n)]
        torch.cuda.empty_cache()
    save_rows(args.out, "streamed_loss.json", rows)


if __name__ == "__main__":
    main()
