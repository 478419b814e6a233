"""Trainer callbacks: a progress bar with loss, tokens/s, memory and time left; the metrics behind it (MFU where
the GPU's peak is known); and a completion marker that makes checkpoints atomic for `--resume`."""
import os
import resource
import sys
import time
from typing import Optional

import torch
from transformers import TrainerCallback

# Dense bf16 tensor-core peak, FLOP/s, from NVIDIA's datasheets (H100 SXM and H200: 989.4 TFLOP/s without
# sparsity; A100: 312). Other devices: MFU is not reported.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
COMPLETE_MARKER = "fastlm_checkpoint_complete"


def gpu_peak_flops() -> Optional[float]:
    """The datasheet peak of the current CUDA GPU, or None when not known (or no GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops_per_token(model, seq_length: int) -> float:
    """Matmul FLOPs per trained token, counted as in the PaLM paper's MFU (appendix B), adapted to adapters.

    Forward 2N (N = parameters in the layers, embeddings excluded); backward 2N for the input gradients, plus 2N
    for weight gradients of trained parameters only (all N in full fine-tuning, the adapters' share with LoRA);
    attention scores and values 6 * layers * hidden * seq_length (forward 2x, backward 4x, causal half not
    subtracted). Recomputation under gradient checkpointing is not counted (MFU counts useful work only).
    """
    total = trained = 0
    for name, param in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        total += param.numel() * (2 if param.dtype == torch.uint8 else 1)  # packed 4-bit: two weights a byte
        trained += param.numel() if param.requires_grad else 0
    config = getattr(model, "config", None)
    attention = 0.0
    if config is not None and hasattr(config, "num_hidden_layers"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention = 6 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_length
    return 4 * total + 2 * trained + attention


def peak_memory_gib() -> float:
    """Peak memory: allocated CUDA memory on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class CheckpointCompleteCallback(TrainerCallback):
    """Writes a marker into each checkpoint once the Trainer has finished writing all of it (on_save runs after
    weights, optimizer, scheduler, RNG and trainer state are on disk). `last_complete_checkpoint` only returns
    marked ones, so a run killed mid-save resumes from the checkpoint before."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                with open(os.path.join(path, COMPLETE_MARKER), "w") as f:
                    f.write(f"{state.global_step}\n")
                    f.flush()
                    os.fsync(f.fileno())


def last_complete_checkpoint(checkpoints_dir: str) -> Optional[str]:
    """The marked checkpoint-N directory with the largest N, or None."""
    if not os.path.isdir(checkpoints_dir):
        return None
    steps = []
    for name in os.listdir(checkpoints_dir):
        path = os.path.join(checkpoints_dir, name)
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.exists(
                os.path.join(path, COMPLETE_MARKER)):
            steps.append((int(name[11:]), path))
    return max(steps)[1] if steps else None


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps: loss, tokens/s, peak memory, MFU (when known) and time left; and the
    per-step record behind metrics.json.

    tokens/s counts the non-padding tokens the collator produced in this process (`collator.tokens_seen`).
    """

    def __init__(self, collator, flops_per_token: float = 0.0, enabled: bool = True):
        self.collator = collator
        self.flops_per_token = flops_per_token
        self.peak_flops = gpu_peak_flops()
        self.enabled = enabled
        self.losses = {}  # optimizer step -> loss (the resumed run's earlier steps included)
        self.log = []  # this process's steps: loss, tokens/s, MFU, peak memory, time so far and time left
        self.bar = None
        self.start = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        self.first_step = state.global_step
        self.collator.tokens_seen = 0
        for entry in state.log_history:  # resumed: the curve so far
            if "loss" in entry:
                self.losses[entry["step"]] = entry["loss"]
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="fastlm", unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def tokens_per_second(self) -> float:
        elapsed = time.time() - self.start if self.start else 0.0
        return self.collator.tokens_seen / elapsed if elapsed > 0 else 0.0

    def mfu(self) -> Optional[float]:
        if not self.peak_flops or not self.flops_per_token:
            return None
        return self.tokens_per_second() * self.flops_per_token / self.peak_flops

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]
            elapsed = time.time() - self.start
            done = state.global_step - self.first_step
            self.log.append({"step": state.global_step, "loss": logs["loss"], "seconds": elapsed,
                             "tokens_per_second": self.tokens_per_second(), "mfu": self.mfu(),
                             "peak_memory_gib": peak_memory_gib(),
                             "seconds_left": elapsed / done * (state.max_steps - state.global_step) if done else None})
            if self.bar is not None:
                shown = {"loss": f"{logs['loss']:.4f}", "tok/s": f"{self.tokens_per_second():,.0f}",
                         "mem": f"{peak_memory_gib():.1f}GiB"}
                if self.mfu() is not None:
                    shown["mfu"] = f"{self.mfu():.1%}"
                self.bar.set_postfix(shown, refresh=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> dict:
        """What metrics.json records about speed and memory."""
        elapsed = time.time() - self.start if self.start else 0.0
        return {"progress": self.log, "train_seconds": elapsed, "tokens_trained": self.collator.tokens_seen,
                "tokens_per_second": self.tokens_per_second(), "flops_per_token": self.flops_per_token,
                "peak_flops": self.peak_flops,
                "peak_flops_source": "NVIDIA datasheet, dense bf16" if self.peak_flops else None,
                "mfu": self.mfu(), "peak_memory_gib": peak_memory_gib(),
                "peak_memory_kind": "cuda max allocated" if torch.cuda.is_available() else "process peak RSS"}
