"""The end of a run: the loss-curve PNG, the final save (adapter or model, tokenizer, metrics.json) and the
printed summary."""
import json
import os
from typing import Optional

from fastlm.loading.atomic import staged_files


def plot_loss_curve(steps: list, losses: list, path: str) -> Optional[str]:
    """Write the training loss per optimizer step to `path` (PNG); None (and a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastlm: matplotlib is not installed, so no loss_curve.png (pip install matplotlib)")
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    axes.plot(steps, losses, marker="o" if len(steps) <= 60 else None, markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log" if min(losses) > 0 and max(losses) / min(losses) > 50 else "linear")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    staging = path + ".tmp.png"
    figure.savefig(staging)
    plt.close(figure)
    os.replace(staging, path)
    return path


def save_final(model, tokenizer, metrics: dict, output_dir: str, metrics_file: str) -> None:
    """Save the adapter (or the full model), the tokenizer and metrics.json through a staging directory
    (fastlm.loading.atomic.staged_files), metrics.json moved in last: a run with metrics.json is complete."""
    with staged_files(output_dir, last=(metrics_file,)) as staging:
        _save_model(model, staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, metrics_file), "w") as f:
            json.dump(metrics, f, indent=1)


def _save_model(model, path: str) -> None:
    """PeftModel: the adapter. A full model loaded from GGUF keeps a quantizer that refuses to save; the weights
    are plain tensors by then, so it is dropped for the save (see DESIGN.md, SmolLM2 facts)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(path)
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(path)


def _one_line(text: str, width: int = 100) -> str:
    return " ".join(str(text).split())[:width]


def print_report(metrics: dict, output_dir: str, plot: Optional[str]) -> None:
    """Accuracy side by side with example generations, speed and memory, and where every file went."""
    if metrics["exact_match_before"] is not None:
        print(f"fastlm: held-out exact match: {metrics['exact_match_before']:.1%} before -> "
              f"{metrics['exact_match_after']:.1%} after ({metrics['eval_examples']} examples)")
        for example in metrics["examples"][:3]:
            print(f"  input:    {_one_line(example['prompt'].splitlines()[-1])}\n"
                  f"  before:   {_one_line(example['before'])}\n  after:    {_one_line(example['after'])}\n"
                  f"  expected: {example['expected']}")
    mfu = f", MFU {metrics['mfu']:.1%} of {metrics['peak_flops'] / 1e12:.0f} TFLOP/s" if metrics["mfu"] else ""
    print(f"fastlm: loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f} in {metrics['steps']} steps, "
          f"{metrics['train_seconds']:.0f} s, {metrics['tokens_per_second']:,.0f} tokens/s{mfu}, peak memory "
          f"{metrics['peak_memory_gib']:.2f} GiB ({metrics['peak_memory_kind']})")
    weights = "adapter_model.safetensors" if os.path.exists(os.path.join(output_dir, "adapter_model.safetensors")) \
        else "model.safetensors"
    lines = [f"fastlm: saved in {output_dir}", f"  weights:     {weights} (+ tokenizer)", "  metrics:     metrics.json"]
    if plot:
        lines.append(f"  loss curve:  {os.path.basename(plot)}")
    lines.append("  checkpoints: checkpoints/ (continue an interrupted run with --resume)")
    print("\n".join(lines), flush=True)
