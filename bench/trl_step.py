"""fastlm under TRL's SFTTrainer with batches of varying length, with and without length buckets, in one call.

    python3 bench/trl_step.py --out $OUT [--shape 1b] [--variant lora16] [--batch 4] [--lengths 1024,2048]
        [--steps 20]

SFTTrainer (TRL 1.x) computes the loss with its own fused LM head from `model.base_model(...)`, so the length
buckets act in the decoder's forward (fastlm.models.causal_lm.decoder_forward). Rows of random token ids of
lengths drawn from --lengths (pre-tokenized: TRL skips tokenizing), padded per batch by TRL's collator to the
batch's longest row, so nearly every step has a new length. Runs of the same model and data (--settings):
FASTLM_LENGTH_BUCKETS=auto (the default: on a GPU with graphed layers, lengths rounded up to 4 buckets per doubling)
and =0 (each new length runs eagerly once, is captured at its second call, and past 24 shapes a layer runs eagerly:
what TRL users had before the decoder took the buckets), either with +mask (right-padded batches keep their
attention mask: the padding-mask drop's ablation), and hf: transformers + PEFT (+ bitsandbytes for qlora)
under the same SFTConfig, the baseline. Reports the mean step time over the last half of the steps and over all,
and the ratios. Each run is a process of its own (--setting): Triton and TRL compile kernels per new
shape, and a second run in the same process would find the first's compiled.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import _layer_graphs, import_fastlm_first, load, make_checkpoint  # noqa: E402
from bench.trainer_step import step_starts  # noqa: E402


def dataset(rows: int, lengths: tuple, vocab: int):
    """`rows` rows of random token ids, each of a length drawn from lengths (seeded), as a datasets.Dataset (given
    a fingerprint: datasets' own pickles the Arrow table, which fails on the H200 image, see tests/test_trl.py)."""
    import datasets
    import pyarrow
    from datasets.table import InMemoryTable

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (rows,), generator=g).tolist()
    table = pyarrow.Table.from_pylist([{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()}
                                       for n in sizes])
    return datasets.Dataset(InMemoryTable(table), fingerprint=f"fastlm-trl-step-{rows}-{lengths[0]}-{lengths[1]}")


def run(setting: str, args, path: str) -> dict:
    import trl
    from transformers import AutoTokenizer

    hf = setting == "hf"
    if not hf:
        from fastlm.models import causal_lm
        buckets, _, keep_mask = setting.partition("+")
        causal_lm.DROP_PADDING_MASK = keep_mask != "mask"
        os.environ["FASTLM_LENGTH_BUCKETS"] = buckets
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = load(args.variant, path, fast=not hf)
    tokenizer = AutoTokenizer.from_pretrained(path)
    total = 3 + args.steps
    config = trl.SFTConfig(output_dir=os.path.join(args.out, "trl"), per_device_train_batch_size=args.batch,
                           max_steps=total, learning_rate=1e-4, bf16=True, logging_steps=1, report_to="none",
                           save_strategy="no", max_length=args.lengths[1], disable_tqdm=True, seed=0,
                           logging_nan_inf_filter=False, dataloader_num_workers=0)
    starts = step_starts((3, total - 1) if args.profile else ())
    trainer = trl.SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[starts],
                             train_dataset=dataset(args.batch * total, args.lengths, model.config.vocab_size))
    trainer.train()
    times = [b - a for a, b in zip(starts.times, starts.times[1:])]
    half = times[len(times) // 2:]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    row = dict(length_buckets=None if hf else setting, impl="hf+peft" if hf else "fastlm", variant=args.variant,
               batch=args.batch, lengths=list(args.lengths),
               steps=total, mean_ms_all=round(1000 * sum(times) / len(times), 1),
               mean_ms_last_half=round(1000 * sum(half) / len(half), 1), step_ms=[round(1000 * t, 1) for t in times],
               # peaks[0]: before step 0 (the first process also makes the random checkpoint: make_checkpoint)
               peak_alloc_gib=max(starts.peaks[1:]), load_peak_alloc_gib=starts.peaks[0],
               step_peak_gib=starts.peaks[1:],
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))
    graphs = _layer_graphs(model.get_base_model())  # do the layers replay CUDA graphs under SFTTrainer, and if not, why
    row.update(layer_graphs=graphs.captured() if graphs is not None else 0,
               why_eager=getattr(graphs, "why_eager", None), graphs_broken=getattr(graphs, "broken", None))
    print(json.dumps(row), flush=True)
    if args.profile:  # host time by function over the profiled steps (bench/trainer_step.profile_summary)
        from bench.trainer_step import profile_summary, report_profile
        report_profile(profile_summary(starts, total - 4), host_chars=9000)
    del trainer, model
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--variant", default="lora16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--settings", default="auto,0,hf",
                        help="FASTLM_LENGTH_BUCKETS settings (with +mask: the padding mask kept, the ablation of "
                             "causal_lm.DROP_PADDING_MASK), and hf: the baseline")
    parser.add_argument("--setting", help="run this one setting here (one process per setting)")
    parser.add_argument("--profile", action="store_true", help="with --setting: profile steps 3 to the last but one")
    args = parser.parse_args()
    lengths = args.lengths
    args.lengths = tuple(int(n) for n in args.lengths.split(","))
    if args.setting is not None:
        import_fastlm_first(["hf"] if args.setting == "hf" else ["fastlm"])
        return run(args.setting, args, make_checkpoint(args.shape))
    rows = []
    for setting in args.settings.split(","):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--setting", setting, "--out", args.out,
                               "--shape", args.shape, "--variant", args.variant, "--batch", str(args.batch),
                               "--lengths", lengths, "--steps", str(args.steps)], capture_output=True, text=True)
        found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"length_buckets"')]
        if done.returncode != 0 or not found:
            raise RuntimeError(f"the {setting} run failed:\n{done.stderr[-3000:]}")
        rows.append(found[-1])
    by_setting = {row["length_buckets"] or "hf": row for row in rows}
    for name, other in (("no_buckets", "0"), ("mask_kept", "auto+mask"), ("hf", "hf")):
        if "auto" in by_setting and other in by_setting:
            for part in ("last_half", "all"):
                by_setting["auto"][f"speed_vs_{name}_{part}"] = round(
                    by_setting[other][f"mean_ms_{part}"] / by_setting["auto"][f"mean_ms_{part}"], 3)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"trl_step_{args.shape}_{args.variant}.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
