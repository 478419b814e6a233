"""A fastlm model works unchanged in TRL's SFTTrainer (plain text, prompt/completion and chat data, with gradient
accumulation). trl is a test-only dependency: fastlm never imports it."""
import pytest
import torch

from fastlm import FastLanguageModel

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pyarrow = pytest.importorskip("pyarrow")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _dataset(kind: str):
    """The rows of _rows(kind) as a datasets.Dataset. The fingerprint is given: datasets' own pickles the Arrow
    table, which fails on the H200 image (Python 3.12 with pyarrow 26's wheel: "Can't pickle <class
    'MonthDayNano'>") before any fastlm code runs; the fingerprint only names the dataset in datasets' cache."""
    from datasets.table import InMemoryTable
    table = InMemoryTable(pyarrow.Table.from_pylist(_rows(kind)))
    return datasets.Dataset(table, fingerprint=f"fastlm-test-trl-{kind}")


def _rows(kind: str) -> list:
    if kind == "text":
        return [{"text": f"note {i}: " + "alpha beta " * (1 + i % 3)} for i in range(8)]
    if kind == "prompt_completion":
        return [{"prompt": f"count to {i}:", "completion": " " + " ".join(map(str, range(i)))} for i in range(2, 10)]
    return [{"messages": [{"role": "user", "content": f"double {i}"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(8)]


@pytest.mark.parametrize("kind,bf16", [("text", False), ("prompt_completion", False), ("messages", False),
                                       ("text", True)])
def test_sft_trainer_trains_a_fastlm_model(tiny_checkpoint, tmp_path, kind, bf16):
    """bf16=True: the Trainer's bf16 mixed precision (autocast; on the CPU too) over fastlm's fp32 adapters."""
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True,
                                                         max_seq_length=64)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                         max_length=64, disable_tqdm=True, bf16=bf16,
                         use_cpu=bf16 and not torch.cuda.is_available())  # bf16 on a CPU needs it said
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset(kind),
                             processing_class=tokenizer)
    trainer.train()
    assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


@pytest.mark.gpu
def test_sft_trainer_fp16_on_gpu(tiny_checkpoint, tmp_path):
    """fp16 mixed precision (what fastlm picks on GPUs without bf16): an fp16 model, fp32 adapters, the Trainer's
    gradient scaler. CUDA only (accelerate has no fp16 autocast on the CPU)."""
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True,
                                                         max_seq_length=64, dtype=torch.float16)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                         max_length=64, disable_tqdm=True, fp16=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset("text"),
                             processing_class=tokenizer)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "fp16"
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_sft_trainer_layers_run_at_length_buckets(tiny_checkpoint, tmp_path, monkeypatch):
    """SFTTrainer (TRL 1.x) computes its loss with its own fused LM head from `model.base_model(...)`, not through
    fastlm's causal-LM forward; the decoder's own forward (fastlm.models.causal_lm.decoder_forward) still runs the
    layers at length buckets (FASTLM_LENGTH_BUCKETS=1: on a GPU with graphed layers "auto" does it), and the losses
    equal the run without buckets (fp32: relative 1e-5, the padding only changes GEMM row counts)."""
    from fastlm.training import length_buckets

    monkeypatch.setenv("FASTLM_FAST_PATH", "1")
    if not torch.cuda.is_available():  # the kernels' PyTorch references (tests/kernels test the kernels): faster
        monkeypatch.setenv("TRITON_INTERPRET", "0")

    def train(setting):
        monkeypatch.setenv(length_buckets.SWITCH, setting)
        model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True,
                                                             max_seq_length=64, dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
        lengths = []
        model.get_base_model().model.norm.register_forward_pre_hook(lambda module, args: lengths.append(
            args[0].shape[1]))
        args = trl.SFTConfig(output_dir=str(tmp_path / setting), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                             max_length=64, disable_tqdm=True, bf16=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset("text"), processing_class=tokenizer)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], lengths

    plain_losses, plain_lengths = train("0")
    losses, lengths = train("1")
    assert len(lengths) == 3 and all(n == 64 for n in lengths), lengths
    assert all(n < 64 for n in plain_lengths), plain_lengths
    assert losses == pytest.approx(plain_losses, rel=1e-5)


def test_sft_trainer_keeps_offloaded_checkpointing(tiny_checkpoint, tmp_path):
    """SFTConfig turns gradient checkpointing on by default (transformers' Trainer then installs torch's checkpoint
    through the model's `_set_gradient_checkpointing`); a model set up with use_gradient_checkpointing="unsloth"
    keeps its own OffloadedCheckpoint (the same object: its CUDA graphs and saved attention stay with it)."""
    from fastlm.training.checkpointing import checkpointing_module
    from fastlm.training.offload import OffloadedCheckpoint

    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True,
                                                         max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="unsloth")
    _, before = checkpointing_module(model)
    assert isinstance(before, OffloadedCheckpoint)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                         save_strategy="no", max_length=64, disable_tqdm=True, bf16=False)
    assert args.gradient_checkpointing  # TRL's default
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset("text"), processing_class=tokenizer)
    trainer.train()
    _, after = checkpointing_module(model)
    assert after is before
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing and layer._gradient_checkpointing_func is before for layer in layers)


@pytest.mark.parametrize("peft", [True, False])
def test_sft_trainer_right_padding_runs_without_mask(tiny_checkpoint, tmp_path, monkeypatch, peft):
    """TRL's fused LM head runs the decoder itself; fastlm's hook before it (causal_lm.hook_fused_head, on the
    causal LM, reached through the PeftModel or, for full fine-tuning, directly) drops the mask of right-padded
    batches whose padding has no label, as fastlm's own loss does: the decoder sees attention_mask None, and the
    losses and trained weights equal those of the run that keeps the mask (fp32: losses relative 1e-5, weights after
    SGD steps 1e-5 of their size plus 1e-6; causal attention gives every real position the same keys, so only the
    summation order differs). The run with the drop turned off (causal_lm.DROP_PADDING_MASK) passes the mask on."""
    from fastlm.models import causal_lm

    monkeypatch.setenv("FASTLM_FAST_PATH", "1")
    if not torch.cuda.is_available():  # the kernels' PyTorch references (tests/kernels test the kernels): faster
        monkeypatch.setenv("TRITON_INTERPRET", "0")

    def train(drop):
        monkeypatch.setattr(causal_lm, "DROP_PADDING_MASK", drop)
        model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True,
                                                             max_seq_length=64, dtype=torch.float32,
                                                             full_finetuning=not peft)
        if peft:
            model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
        decoder = model.get_base_model().model if peft else model.model
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        masks = []
        decoder.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")),
                                          with_kwargs=True)
        # SGD: the weights move by lr x gradient, so their difference is the gradients'. AdamW's first steps move
        # each weight by about lr x sign(gradient), which turns summation-order noise in a near-zero gradient
        # into a difference of up to 2 lr (seen on the H200 for full fine-tuning, run 103).
        args = trl.SFTConfig(output_dir=str(tmp_path / str(drop)), per_device_train_batch_size=3, max_steps=2,
                             learning_rate=1e-2, optim="sgd", logging_steps=1, report_to="none", save_strategy="no",
                             max_length=64, disable_tqdm=True, bf16=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_dataset("prompt_completion"),
                                 processing_class=tokenizer)
        trainer.train()
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(not torch.equal(weights[n], initial[n]) for n in weights)  # SGD moved every trained weight
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], masks, weights

    kept_losses, kept_masks, kept_weights = train(False)
    losses, masks, weights = train(True)
    assert len(masks) == 2 and all(mask is None for mask in masks), masks
    assert all(torch.is_tensor(mask) and not bool(mask.all()) for mask in kept_masks)  # the batches are padded
    assert losses == pytest.approx(kept_losses, rel=1e-5)
    for name, weight in weights.items():
        torch.testing.assert_close(weight, kept_weights[name], rtol=1e-5, atol=1e-6, msg=name)
