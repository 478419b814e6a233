"""How fast the GPU reads an embedding kept in pinned host memory (offload_embedding=True), on the H200.

    python3 bench/host_embedding.py --out $OUT

For Llama-3.2-1B's and Llama-3.1-8B's embedding shapes (128256 x 2048 / x 4096, bf16) and a batch's tokens (8192 /
4096): F.embedding from device memory, then from the same values in pinned host memory through three aliases a CUDA
kernel can read (fastlm.loading.host_weights.host_mapped, i.e. torch.as_tensor over a __cuda_array_interface__;
a storage from torch._C._construct_storage_from_data_pointer; a Triton gather given the pinned CPU tensor itself),
each checked equal to the device lookup, with the device memory each alias allocates and the GB/s it reaches.
Times are bench.common.time_ms's medians; bench/RESULTS.md run 53 measured the same lookups with a scratch script
(means of 20 calls).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import gbps, reported, save_rows, time_ms  # noqa: E402
from fastlm.loading.host_weights import host_mapped  # noqa: E402

VOCAB = 128256


@triton.jit
def _gather_rows(weight_ptr, ids_ptr, out_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    index = tl.load(ids_ptr + row).to(tl.int64)
    for start in range(0, H, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < H
        tl.store(out_ptr + row * H + cols, tl.load(weight_ptr + index * H + cols, mask=inside), mask=inside)


def measure(hidden: int, tokens: int) -> dict:
    weight = torch.randn(VOCAB, hidden, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (tokens,), device="cuda")
    expected = F.embedding(ids, weight)
    row = dict(hidden=hidden, tokens=tokens, mib_read=tokens * hidden * 2 / 2**20,
               device_ms=time_ms(lambda: F.embedding(ids, weight)))
    allocated = torch.cuda.memory_allocated()
    mapped = host_mapped(weight)
    row.update(mapped_alloc_bytes=torch.cuda.memory_allocated() - allocated,
               mapped_equal=bool(torch.equal(F.embedding(ids, mapped), expected)),
               mapped_ms=time_ms(lambda: F.embedding(ids, mapped)))
    host = weight.cpu().pin_memory()
    storage = torch._C._construct_storage_from_data_pointer(host.data_ptr(), weight.device,
                                                           host.untyped_storage().nbytes())
    aliased = torch.empty(0, dtype=weight.dtype, device="cuda").set_(storage, 0, host.shape, host.stride())
    row.update(storage_equal=bool(torch.equal(F.embedding(ids, aliased), expected)),
               storage_ms=time_ms(lambda: F.embedding(ids, aliased)))
    out = torch.empty(tokens, hidden, device="cuda", dtype=weight.dtype)
    launch = lambda: _gather_rows[(tokens,)](host, ids, out, H=hidden, BLOCK=1024)  # noqa: E731
    launch()
    row.update(triton_equal=bool(torch.equal(out, expected)), triton_ms=time_ms(launch))
    row["mapped_gb_per_s"] = gbps(tokens * hidden * 2, row["mapped_ms"])
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    save_rows(args.out, "host_embedding.json", [reported(measure(2048, 8192)), reported(measure(4096, 4096))])


if __name__ == "__main__":
    main()
