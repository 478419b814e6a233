"""Which part of fastlm's training path costs or saves what: one model, one process, features switched off one
at a time (H200).

    python3 bench/ablate_step.py --out $OUT --shape 1b --variant qlora --batch 4

Loads the bench/train_step.py model once with fastlm, then times (3 warm-up + N steps, median) and profiles
(kernel launches, GPU kernel time, busy share) each setting in turn:
    all           as shipped
    no-skip       the recomputation computes the MLP's down projection again
    no-memo       LoRA casts made at every call (the memo of casts off; the reuse of x A^T products stays)
    ckpt-true     torch's non-reentrant checkpoint instead of the offloaded one
    no-ckpt       no gradient checkpointing
    gc-frozen     as shipped, after gc.freeze() (Python's cyclic collector no longer walks the loaded objects)
    gc-disabled   as shipped, with Python's cyclic collector off
"all again" repeats the first setting at the end, to show drift over the run.
The switches are monkeypatches of this process only (bench code, not library options).
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.profile_step import step  # noqa: E402
from bench.train_step import add_setting_arguments, import_fastlm_first, load, make_checkpoint  # noqa: E402
from fastlm.kernels import lora as lora_op, lora_mlp as mlp_op  # noqa: E402
from fastlm.training.checkpointing import set_gradient_checkpointing  # noqa: E402


def measure(model, ids, optimizer, steps):
    times = []
    for _ in range(3 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, ids, optimizer)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    ms = 1000 * sorted(times[3:])[len(times[3:]) // 2]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(model, ids, optimizer)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    compute = [e for e in kernels if "Memcpy" not in e.name]
    gpu_ms = sum(e.device_time_total for e in compute) / 1000
    return dict(ms_per_step=round(ms, 1), launches=len(kernels), gpu_compute_ms=round(gpu_ms, 1),
                gpu_busy=round(gpu_ms / ms, 3))


def main():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    parser.add_argument("--variant", default="qlora")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    import_fastlm_first(["fastlm"])
    path = make_checkpoint(args.shape)
    torch.manual_seed(0)
    model = load(args.variant, path, fast=True)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0)).cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    settings = [
        ("all", {}),
        ("gc-frozen", {"gc": "freeze"}),
        ("no-skip", {"_recomputing": lambda: False}),
        ("no-memo", {"_memoized": lambda key, sources, make: make()}),
        ("ckpt-true", {"checkpointing": True}),
        ("no-ckpt", {"checkpointing": False}),
        ("all again", {}),
        ("gc-disabled", {"gc": "disable"}),
    ]
    rows = []
    for name, patches in settings:
        patches = dict(patches)
        gc_mode = patches.pop("gc", None)
        if gc_mode == "freeze":  # everything alive now moves out of the collector's reach (until unfreeze)
            gc.collect()
            gc.freeze()
        elif gc_mode == "disable":
            gc.disable()
        owner = {"_recomputing": mlp_op, "_memoized": lora_op}  # the module that looks the name up
        saved = {k: getattr(owner[k], k) for k in patches if k != "checkpointing"}
        for key, value in patches.items():
            if key != "checkpointing":
                setattr(owner[key], key, value)
        set_gradient_checkpointing(model, patches.get("checkpointing", "unsloth"))
        try:
            torch.cuda.reset_peak_memory_stats()
            row = dict(setting=name, **measure(model, ids, optimizer, args.steps),
                       peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        except Exception as exc:
            row = dict(setting=name, error=repr(exc)[:300])
        for key, value in saved.items():
            setattr(owner[key], key, value)
        gc.unfreeze()
        gc.enable()
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape, variant=args.variant,
                batch=args.batch, seq=args.seq)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"ablate_{args.shape}_{args.variant}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
