"""fastlm's training step data-parallel over several GPUs (DDP through NCCL, one process a GPU) against one GPU,
in the same call.

    python3 bench/ddp_step.py --out $OUT [--shape 1b] [--variant qlora] [--batch 4] [--gpus 2] [--steps 10]

Each run is a torch.distributed.run job of bench/ddp_step.py --worker: first 1 process (no DDP wrap: what a user
of one GPU runs), then --gpus processes, each rank on its own GPU with its own `batch` sequences (so the global
batch is gpus x batch) and the model wrapped in DistributedDataParallel. Both load the model as
bench/train_step.py does (fastlm, LoRA r=16 on every projection, offloaded checkpointing) and time 3 warm-up and
`steps` steps of AdamW (median). Reports ms/step, tokens/s over all ranks and the scaling efficiency: the N-GPU
tokens/s over N times the one-GPU tokens/s.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(args) -> None:
    import fastlm  # noqa: F401  (before CUDA is touched: its allocator settings apply, as in train_step)
    from bench.profile_step import step
    from bench.train_step import load

    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        torch.distributed.init_process_group("nccl")
    rank, device = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = load(args.variant, args.checkpoint, fast=True)  # placed on this rank's GPU (LOCAL_RANK)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device])
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(rank)
    ids = torch.randint(3, 128256, (args.batch, args.seq), generator=g).cuda()
    times, losses = [], []
    for _ in range(3 + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(model, ids, optimizer)  # forward under bf16 autocast, backward, AdamW step, zero_grad
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    ms = 1000 * sorted(times[3:])[len(times[3:]) // 2]
    if rank == 0:
        print(json.dumps(dict(gpus=world, shape=args.shape, variant=args.variant, batch_per_gpu=args.batch,
                              seq=args.seq, ms_per_step=round(ms, 1),
                              tokens_per_s=round(world * args.batch * args.seq / (ms / 1000)),
                              peak_alloc_gib_rank0=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                              loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))), flush=True)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(args, gpus: int, checkpoint: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               os.path.abspath(__file__), "--worker", "--checkpoint", checkpoint, "--shape", args.shape,
               "--variant", args.variant, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"{gpus}-GPU run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return rows[0]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--variant", default="qlora")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--checkpoint")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from bench.train_step import make_checkpoint
    checkpoint = make_checkpoint(args.shape)
    one, many = run(args, 1, checkpoint), run(args, args.gpus, checkpoint)
    many["scaling"] = round(many["tokens_per_s"] / (args.gpus * one["tokens_per_s"]), 3)
    for row in (one, many):
        print(json.dumps(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ddp_step.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=[one, many]), f, indent=1)


if __name__ == "__main__":
    main()
