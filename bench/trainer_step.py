"""The training step as a Trainer user gets it: fastlm against transformers + PEFT, both under the same
transformers.Trainer settings, in one call.

    python3 bench/trainer_step.py --out $OUT [--shape 1b] [--variants qlora,lora16] [--batch 4] [--steps 10] \
        [--impls fastlm,hf] [--profile] [--trainer-args logging_steps=10,max_grad_norm=0]

bench/train_step.py times the bare step (forward, backward, AdamW). A user runs it through the HF Trainer (or TRL's
SFTTrainer, a Trainer), which adds per step: the collator, autocast, gradient clipping (max_grad_norm 1.0), the
learning-rate schedule, the loss's logging (a host sync) and callbacks. Here both implementations load as
train_step.load does (LoRA r=16 on every projection, gradient checkpointing: fastlm's "unsloth", HF's
non-reentrant) and train 3 + `steps` steps of random token ids with the same TrainingArguments (bf16, adamw_torch,
logging every step); a step's time is the wall time between consecutive steps' starts (the GPU synchronized
there), so it holds everything the Trainer does. Reports the median, tokens/s and the ratio.
"""
import argparse
import cProfile
import io
import json
import pstats
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.train_step import import_fastlm_first, load, make_checkpoint  # noqa: E402


class RandomIds(torch.utils.data.Dataset):
    """`count` rows of `seq` random token ids (seeded), each its own labels."""

    def __init__(self, count: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (count, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def step_starts(profile_steps: tuple = ()):
    """A TrainerCallback recording the wall time at each step's start, after synchronizing the GPU, and each step's
    peak allocated GiB (`.peaks`: the peak since the previous step's start, the first one since the process began); with
    profile_steps=(first, last) the steps first..last-1 also run under torch.profiler and cProfile (`.profiles`)."""
    from transformers import TrainerCallback

    class StepStarts(TrainerCallback):
        def __init__(self):
            self.times, self.peaks, self.profiles, self.wall_ms = [], [], None, None

        def _mark(self):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 2))
            torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self._mark()
            if profile_steps and state.global_step == profile_steps[0]:
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.profiles = (torch.profiler.profile(activities=activities), cProfile.Profile())
                self.profiles[0].__enter__()
                self.profiles[1].enable()
            if profile_steps and state.global_step == profile_steps[1]:
                self.profiles[1].disable()
                self.profiles[0].__exit__(None, None, None)
                self.wall_ms = 1000 * (self.times[-1] - self.times[-1 - profile_steps[1] + profile_steps[0]])

        def on_train_end(self, args, state, control, **kwargs):
            self._mark()

    return StepStarts()


def profile_summary(starts, profiled_steps: int) -> dict:
    """GPU busy/idle and the longest gaps (bench/profile_step.idle_gaps), kernel time by category, and the host's
    cumulative cProfile top functions, per profiled Trainer step."""
    from bench.profile_step import category, idle_gaps

    device_events = [e for e in starts.profiles[0].events() if e.device_type == torch.autograd.DeviceType.CUDA]
    wall_ms = starts.wall_ms / profiled_steps
    by_category = {}
    for e in device_events:
        by_category[category(e.name)] = by_category.get(category(e.name), 0.0) + e.device_time_total / 1000
    text, callers = io.StringIO(), io.StringIO()
    pstats.Stats(starts.profiles[1], stream=text).sort_stats("cumulative").print_stats(45)
    # who walks the module tree (nn.Module.parameters / named_parameters / named_modules / train) each step
    pstats.Stats(starts.profiles[1], stream=callers).sort_stats("cumulative").print_callers(
        r"module\.py.*\((parameters|named_parameters|named_modules|train)\)")
    return dict(wall_ms_profiled=round(wall_ms, 1), **idle_gaps(device_events, wall_ms, profiled_steps, top=20),
                by_category={k: round(v / profiled_steps, 2) for k, v in sorted(by_category.items(),
                                                                                  key=lambda kv: -kv[1])},
                launches_per_step=len(device_events) // profiled_steps, host_cprofile=text.getvalue(),
                host_callers=callers.getvalue())


def report_profile(summary: dict, host_chars: int = 6000) -> None:
    """Print profile_summary's figures as one JSON line, then the head of its host cProfile table and the callers
    of the module-tree walks."""
    print(json.dumps({k: v for k, v in summary.items() if k not in ("host_cprofile", "host_callers")}), flush=True)
    print(summary["host_cprofile"][:host_chars], flush=True)
    print(summary["host_callers"][:host_chars], flush=True)


def run(variant: str, path: str, fast: bool, batch: int, seq: int, steps: int, out_dir: str,
        profile: bool = False, overrides: dict = None) -> dict:
    from transformers import Trainer, TrainingArguments

    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = load(variant, path, fast)
    torch.cuda.reset_peak_memory_stats()
    settings = dict(output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=batch,
                    max_steps=3 + steps, learning_rate=1e-4, bf16=True, optim="adamw_torch", logging_steps=1,
                    report_to="none", save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0)
    args = TrainingArguments(**{**settings, **(overrides or {})})
    starts = step_starts((5, 7) if profile else ())
    trainer = Trainer(model=model, args=args, train_dataset=RandomIds(batch * (3 + steps), seq,
                                                                      model.config.vocab_size),
                      callbacks=[starts])
    trainer.train()
    step_times = [b - a for a, b in zip(starts.times, starts.times[1:])][3:]
    ms = 1000 * sorted(step_times)[len(step_times) // 2]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    row = dict(variant=variant, impl="fastlm" if fast else "hf+peft", batch=batch, seq=seq, ms_per_step=round(ms, 1),
               tokens_per_s=round(batch * seq / (ms / 1000)),
               peak_alloc_gib=max(starts.peaks),
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), trainer_args=overrides or {})
    print(json.dumps(row), flush=True)
    if profile:
        row["profile"] = profile_summary(starts, 2)
        report_profile(row["profile"])
    del trainer, model
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--variants", default="qlora,lora16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--impls", default="fastlm,hf")
    parser.add_argument("--profile", action="store_true", help="profile steps 5-6 (profiler and cProfile)")
    parser.add_argument("--trainer-args", default="", help="TrainingArguments overrides, e.g. "
                        "logging_steps=10,max_grad_norm=0 (values read as JSON where they parse)")
    args = parser.parse_args()
    impls = args.impls.split(",")
    overrides = dict(item.split("=", 1) for item in args.trainer_args.split(",") if item)
    for key, value in overrides.items():
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            pass  # a string
    import_fastlm_first(impls)
    path = make_checkpoint(args.shape)
    rows = []
    for variant in args.variants.split(","):
        pair = [run(variant, path, impl == "fastlm", args.batch, args.seq, args.steps, args.out, args.profile,
                    overrides) for impl in impls]
        if len(pair) == 2:
            pair[0]["speed_vs_hf"] = round(pair[1]["ms_per_step"] / pair[0]["ms_per_step"], 3)
            pair[0]["memory_vs_hf"] = round(pair[0]["peak_alloc_gib"] / pair[1]["peak_alloc_gib"], 3)
        rows += pair
    os.makedirs(args.out, exist_ok=True)
    tag = args.trainer_args.replace("=", "-").replace(",", "_")
    with open(os.path.join(args.out, f"trainer_step_{args.shape}{'_' + tag if tag else ''}.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape, rows=rows), f,
                  indent=1)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
