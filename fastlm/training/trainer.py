"""The HF Trainer as fastlm drives it: exact gradient accumulation, mixed precision on GPUs, atomic checkpoints.

Exact gradient accumulation comes from the Trainer itself, given a model whose forward takes **kwargs (every
transformers causal LM; PEFT forwards them): for each optimizer step it counts the label tokens of all the
micro-batches it accumulates (`num_items_in_batch`, summed across data-parallel ranks by
`average_tokens_across_devices`) and the model's loss is the sum over label tokens divided by that count, so
batch 1 x accumulation 8 gives the gradient of batch 8 x accumulation 1. tests/test_training_exact.py checks it.
"""
import os
from typing import Optional

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from fastlm.training.callbacks import CheckpointCompleteCallback


class ExampleDataset(Dataset):
    """Encoded examples ({"input_ids", "labels"}) as a map-style dataset."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def mixed_precision(model) -> dict:
    """TrainingArguments' bf16/fp16: autocast in the model's compute dtype on a GPU; nothing on the CPU.

    fp16 needs the trained parameters in fp32 (the gradient scaler refuses fp16 gradients)."""
    if not torch.cuda.is_available():
        return {}
    dtype = getattr(getattr(model, "config", None), "dtype", None) or next(model.parameters()).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    trained_fp32 = all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16 and trained_fp32:
        return {"fp16": True}
    return {}


def training_arguments(output_dir: str, *, batch_size: int = 8, gradient_accumulation_steps: int = 1,
                       learning_rate: float = 2e-4, lr_scheduler: str = "linear", warmup_steps: int = 0,
                       max_steps: Optional[int] = None, epochs: Optional[float] = None, seed: int = 3407,
                       save_steps: int = 0, save_total_limit: int = 2, logging_steps: int = 1,
                       weight_decay: float = 0.0, max_grad_norm: float = 1.0, report_to="none",
                       optim: str = "adamw_torch", precision: Optional[dict] = None, **extra) -> TrainingArguments:
    """TrainingArguments for fastlm's training: checkpoints in output_dir (the caller passes
    <run dir>/checkpoints), Trainer-side gradient checkpointing left off (from_pretrained / get_peft_model set it on
    the model), columns kept (the collator needs input_ids and labels only), the Trainer's own printing off
    (fastlm's ProgressCallback shows the progress), and NaN/inf losses logged as they are
    (logging_nan_inf_filter=False): the filter would log the mean of the finite losses instead, hiding a diverged
    run from fastlm's check, and its isnan test on every step's loss waits for the GPU after each backward, leaving
    it idle while the host runs the optimizer step and the next step's preparation (bench/RESULTS.md run 93: 147.9
    against 127.7 ms per 1B LoRA step on the H200)."""
    steps = {"max_steps": max_steps} if max_steps else {"num_train_epochs": epochs or 1.0}
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler, warmup_steps=warmup_steps, seed=seed, data_seed=seed,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=save_total_limit,
        logging_strategy="steps", logging_steps=logging_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        report_to=report_to, optim=optim, remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(), logging_nan_inf_filter=False,
        disable_tqdm=True, dataloader_num_workers=0, **{"average_tokens_across_devices": True, **extra},
        **_cpu_settings(extra), **(precision or {}), **steps)


def _cpu_settings(extra: dict) -> dict:
    """Without CUDA (fastlm then keeps models on the CPU): use_cpu=True, and the gloo backend, so that several CPU
    processes started by torch.distributed.run train data-parallel (DDP, token counts summed across ranks);
    without use_cpu the Trainer sees one process per rank and never all-reduces the gradients
    (tests/test_training_exact.py)."""
    if torch.cuda.is_available():
        return {}
    settings = {"use_cpu": True}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a backend alone makes accelerate expect a process group
        settings["ddp_backend"] = "gloo"
    return {k: v for k, v in settings.items() if k not in extra}


def build_trainer(model, tokenizer, examples: list, collator, args: TrainingArguments, callbacks=()) -> Trainer:
    """A transformers Trainer over encoded `examples`, batched by `collator` (fastlm.training.data.Collator)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(examples), data_collator=collator,
                      processing_class=tokenizer,
                      callbacks=[CheckpointCompleteCallback(), *callbacks])
    for printing in (PrinterCallback, ProgressCallback):  # fastlm's own bar replaces them
        trainer.remove_callback(printing)
    os.makedirs(args.output_dir, exist_ok=True)
    return trainer
