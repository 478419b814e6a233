"""Exact gradient accumulation and packing through the Trainer path fastlm uses (fastlm.training.trainer).

One optimizer step over the same 8 examples of different lengths must see the same loss and the same gradient on
every LoRA parameter whether it is batch 8 x accumulation 1, batch 1 x accumulation 8 or batch 4 x accumulation 2,
padded or packed. The model is whatever FastLanguageModel returns (plain transformers modules today, the fused fast
path later): the tests hold for any model whose loss honours `num_items_in_batch` and packed position_ids.
Tolerance: fp32 (also on a GPU: dtype=torch.float32); padding and packing change only the order of the sums, so
relative 1e-5 of the largest gradient (the design's fp32 rule) is ample; a mean over one micro-batch instead of the
accumulated step would be off by tens of percent.
"""
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from fastlm import FastLanguageModel
from fastlm.training.data import IGNORE, Collator
from fastlm.training.trainer import build_trainer, training_arguments


class GradientRecorder(TrainerCallback):
    """Copies every trainable gradient just before the first optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _examples(vocab: int, seed: int = 0) -> list:
    """8 examples of 5..37 tokens; a prompt part (labels -100) of varying length on half of them."""
    rng = random.Random(seed)
    examples = []
    for i in range(8):
        n = rng.randint(5, 37)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = rng.randint(1, n - 2) if i % 2 else 1
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return examples


def _one_step(checkpoint, tmp_path, batch_size, accumulation, packing, examples=None):
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, load_in_16bit=True, max_seq_length=64,
                                                         dtype=torch.float32)
    # init_lora_weights=False: B is random too, so every adapter matrix has a non-zero gradient.
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
    examples = examples or _examples(model.config.vocab_size)
    recorder = GradientRecorder()
    args = training_arguments(str(tmp_path / f"b{batch_size}a{accumulation}p{int(packing)}"), batch_size=batch_size,
                              gradient_accumulation_steps=accumulation, learning_rate=1e-3, max_steps=1,
                              max_grad_norm=0.0, optim="sgd")
    trainer = build_trainer(model, tokenizer, examples, Collator(tokenizer.pad_token_id, packing), args, [recorder])
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return loss, recorder.grads


def _assert_same(reference, other):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference_step(llama, tmp_path_factory):
    return _one_step(llama, tmp_path_factory.mktemp("ref"), batch_size=8, accumulation=1, packing=False)


@pytest.mark.parametrize("batch_size,accumulation", [(1, 8), (4, 2)])
def test_gradient_accumulation_is_exact(llama, tmp_path, reference_step, batch_size, accumulation):
    _assert_same(reference_step, _one_step(llama, tmp_path, batch_size, accumulation, packing=False))


@pytest.mark.parametrize("batch_size,accumulation", [(8, 1), (2, 4)])
def test_packed_equals_padded(llama, tmp_path, reference_step, batch_size, accumulation):
    _assert_same(reference_step, _one_step(llama, tmp_path, batch_size, accumulation, packing=True))


def test_accumulation_differs_without_token_count(llama, tmp_path, reference_step):
    """The check can fail: averaging per micro-batch (what a loop that divides each micro-batch's mean loss by
    the accumulation count computes) gives a different gradient on these examples."""
    model, tokenizer = FastLanguageModel.from_pretrained(llama, load_in_16bit=True, max_seq_length=64,
                                                         dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
    collator = Collator(tokenizer.pad_token_id)
    for example in _examples(model.config.vocab_size):
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in collator([example]).items()}
        (model(**batch).loss / 8).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    name = next(iter(grads))
    assert not torch.allclose(grads[name], reference_step[1][name], rtol=1e-3, atol=1e-3 * grads[name].abs().max())


def test_packed_rows_restart_positions(llama):
    collator = Collator(pad_token_id=0, packing=True)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]] and "attention_mask" not in batch
    assert batch["use_cache"] is False


def test_packed_without_restarting_positions_differs(llama):
    """The packing check can fail: the same row with positions 0..n-1 (attention crossing examples) differs."""
    model, tokenizer = FastLanguageModel.from_pretrained(llama, load_in_16bit=True, max_seq_length=64,
                                                         dtype=torch.float32)
    examples = _examples(model.config.vocab_size)[:3]
    on_device = lambda batch: {k: v.to(model.device) if torch.is_tensor(v) else v  # noqa: E731
                               for k, v in batch.items()}
    packed = on_device(Collator(tokenizer.pad_token_id, packing=True)(examples))
    padded = on_device(Collator(tokenizer.pad_token_id)(examples))
    with torch.no_grad():
        reference = model(**padded).loss
        assert model(**packed).loss.item() == pytest.approx(reference.item(), rel=1e-5)
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1], device=model.device).unsqueeze(0)
        assert model(**packed).loss.item() != pytest.approx(reference.item(), rel=1e-3)


def _data_parallel_step(checkpoint, out_dir, *flags, gpus: bool = False):
    """(loss, grads) of one step on 2 data-parallel ranks (tests/fixtures/dp_step.py via torch.distributed.run): on
    the CPU (gloo, CUDA hidden so that it runs the same on a GPU machine), or with gpus=True one GPU per rank
    (NCCL)."""
    worker = os.path.join(os.path.dirname(__file__), "fixtures", "dp_step.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", **({} if gpus else {"CUDA_VISIBLE_DEVICES": ""}))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           worker, checkpoint, str(out_dir), *flags], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(os.path.join(out_dir, "grads.pt"))
    return saved["loss"], saved["grads"]


def test_data_parallel_ranks_count_tokens_together(llama, tmp_path, reference_step):
    """2 ranks x batch 2 x accumulation 2 over the same 8 examples: the step's loss and gradients equal one process's
    batch 8 (token counts summed across ranks, DDP's mean undone); dividing by each rank's own count differs."""
    if torch.cuda.is_available():  # the reference step ran on the GPU: recompute it on the CPU like the ranks
        pytest.skip("compares against the CPU reference step; the ranks run on the CPU (gloo)")
    _assert_same(reference_step, _data_parallel_step(llama, tmp_path / "exact"))
    loss, grads = _data_parallel_step(llama, tmp_path / "per_rank", "--per-rank-mean")
    name = next(iter(grads))
    assert not torch.allclose(grads[name], reference_step[1][name], rtol=1e-3,
                              atol=1e-3 * reference_step[1][name].abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across GPUs needs 2")
def test_gpu_data_parallel_across_gpus(llama, tmp_path, reference_step):
    """The Trainer's data parallelism as a multi-GPU user runs it: 2 ranks of one GPU each (from_pretrained's default
    placement follows LOCAL_RANK), NCCL between them; the step equals one process's batch 8 on GPU 0, where the
    reference step ran (fp32: relative 1e-5, as the CPU ranks above)."""
    _assert_same(reference_step, _data_parallel_step(llama, tmp_path / "nccl", gpus=True))


@pytest.mark.gpu
def test_fp16_mixed_precision_on_gpu(llama, tmp_path, reference_step):
    """An fp16 model (what fastlm loads on GPUs without bf16): mixed_precision picks the Trainer's fp16 (autocast and
    gradient scaler) over the fp32 adapters; batch 2 x accumulation 4 gives the fp32 step's loss and the adapters
    move (3 steps: the scaler skips a step whose scaled gradients overflow, as it may the first). Tolerance 1e-2:
    fp16 keeps 11 significant bits (relative 4.9e-4 per rounding of the weights and of each matmul's inputs), and
    the few roundings through this two-layer model stay well below 1e-2; a loss left multiplied by the scaler's
    2^16 would be far outside it."""
    from fastlm.training.trainer import mixed_precision
    model, tokenizer = FastLanguageModel.from_pretrained(llama, load_in_16bit=True, max_seq_length=64,
                                                         dtype=torch.float16)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
    precision = mixed_precision(model)
    assert precision == {"fp16": True}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = training_arguments(str(tmp_path / "fp16"), batch_size=2, gradient_accumulation_steps=4,
                              learning_rate=1e-3, max_steps=3, precision=precision)
    trainer = build_trainer(model, tokenizer, _examples(model.config.vocab_size), Collator(tokenizer.pad_token_id),
                            args)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "fp16"
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert loss == pytest.approx(reference_step[0], rel=1e-2)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_nan_loss_is_logged_not_hidden(llama, tmp_path):
    """A NaN loss reaches the logs, where fastlm's run checks it (finetune: "the loss became NaN/inf"). The
    Trainer's default logging_nan_inf_filter=True would log the running mean of the finite losses instead (0.0 when
    every step is NaN), and its per-step isnan check waits for the GPU after every backward (run 93: 20 ms of a
    148 ms 1B step on the H200); training_arguments turns it off. Fails with the filter on: the logged losses are
    then 0.0."""
    model, tokenizer = FastLanguageModel.from_pretrained(llama, load_in_16bit=True, max_seq_length=64,
                                                         dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False, random_state=1)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    args = training_arguments(str(tmp_path / "nan"), batch_size=4, learning_rate=1e-3, max_steps=2, optim="sgd")
    assert args.logging_nan_inf_filter is False
    trainer = build_trainer(model, tokenizer, _examples(model.config.vocab_size), Collator(tokenizer.pad_token_id),
                            args)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(loss != loss for loss in losses), losses
