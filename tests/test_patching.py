"""The fast path (fastlm.patching.apply_fast_path) against plain transformers + PEFT, for every architecture.

Each test loads the same tiny checkpoint twice with AutoModelForCausalLM (fp32, or NF4 4-bit with fp32 compute),
patches one, adds the same LoRA to both (same seed; init_lora_weights=False so lora_B is random and every LoRA
matrix gets a gradient), runs the same batch, and compares. Tolerance: relative 1e-5 on the loss and on each
LoRA gradient (relative to its largest element), the fp32 rule of the issue; the kernels round once where
transformers rounds several times, and the fused loss sums in another order, which stays below 4e-6 here.
"""
import logging

import pytest
import torch

# Imported here, while TRITON_INTERPRET=1 (conftest): @triton.jit picks interpreter or compiler when the kernel
# modules are first imported, and the 4-bit tests switch the variable off for their duration.
from fastlm.models.registry import spec_for
from fastlm.patching import SWITCH, apply_fast_path, is_patched
from tests.fixtures.compare import assert_same_loss_and_grads
from tests.fixtures.tiny_models import SUPPORTED_TYPES

RTOL = 1e-5
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISIONS = ["16bit", "4bit"]


@pytest.fixture
def kernels_for(monkeypatch):
    """kernels_for(precision, references=False): on CPU, 4-bit tests (and those asking) use the kernels'
    references (see the module docstring)."""
    def choose(precision, references=False):
        if (precision == "4bit" or references) and not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "0")
        return precision
    return choose


def _triton_runs(device) -> bool:
    from fastlm.kernels._utils import interpreting
    return device == "cuda" or interpreting()


def _load(path, precision, attn_implementation=None, device="cpu"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if precision == "4bit":
        pytest.importorskip("bitsandbytes")
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quantization,
                                                 device_map=device, **extra)
    for module in model.modules():  # as fastlm's loader does: keep bitsandbytes' CPU 4-bit path differentiable
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _with_lora(model, model_type, seed=1):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=spec_for(model_type).lora_targets(LORA_TARGETS))
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def plain_and_fast(path, model_type, precision, attn_implementation=None, checkpointing=False, device="cpu"):
    """(plain PeftModel, fast PeftModel) on identical weights and LoRA initialisation.

    checkpointing: the fast model recomputes each layer in backward (non-reentrant gradient checkpointing, as
    FastLanguageModel trains by default); the plain one does not, so recomputation must not change anything."""

    plain = _with_lora(_load(path, precision, attn_implementation, device), model_type)
    base = _load(path, precision, attn_implementation, device)
    report = apply_fast_path(base, spec_for(model_type))
    assert report["loss"] and report["attention"] == report["mlp"] == base.config.num_hidden_layers, report
    assert not report["skipped"], report
    fast = _with_lora(base, model_type)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    return plain, fast


def _loss_and_grads(model, batch, **extra):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**{k: v.to(model.device) for k, v in batch.items()}, **extra)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same_training_signal(plain, fast, batch, **extra):
    plain_out, plain_grads = _loss_and_grads(plain, batch, **extra)
    fast_out, fast_grads = _loss_and_grads(fast, batch, **extra)
    assert fast_out.logits is None, "with labels the fast path must not materialise logits"
    if _triton_runs(fast.device.type):
        assert "FusedLinearCrossEntropy" in type(fast_out.loss.grad_fn).__name__
    assert_same_loss_and_grads((plain_out.loss, plain_grads), (fast_out.loss, fast_grads), RTOL, "fast vs plain")
    return plain_out.loss


def _padded_batch(pad_left=True, length=9, device="cpu"):
    """Two rows of an odd length; the second has 3 padding positions (masked, labels -100)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 500, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_left:
        attention_mask[1, :3] = 0
    else:
        attention_mask[1, -3:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 2)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_padded_batch_loss_logits_grads(model_type, precision, tiny_checkpoint, kernels_for, device):
    plain, fast = plain_and_fast(tiny_checkpoint(model_type), model_type, kernels_for(precision), checkpointing=True,
                                 device=device)
    batch = _padded_batch(device=device)
    # The Trainer's gradient-accumulation convention: sum / num_items_in_batch (here 7, not the 13 labels).
    loss = assert_same_training_signal(plain, fast, batch, num_items_in_batch=torch.tensor(7, device=device))
    # Without labels: logits as transformers computes them (and logits_to_keep honoured).
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        plain.eval(), fast.eval()
        logits = plain(**unlabeled).logits
        torch.testing.assert_close(fast(**unlabeled).logits, logits, rtol=RTOL, atol=1e-6)
        mean_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(loss, mean_loss * labelled / 7, rtol=RTOL, atol=0)
        last = fast(**unlabeled, logits_to_keep=1).logits
        assert last.shape == (2, 1, plain.config.vocab_size)
        torch.testing.assert_close(last, logits[:, -1:], rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_packed_sequences(model_type, precision, tiny_checkpoint, kernels_for, device):
    """Three examples packed in one row of 11 tokens, positions restarting per example, no attention_mask."""
    plain, fast = plain_and_fast(tiny_checkpoint(model_type), model_type, kernels_for(precision), device=device)
    lengths = (4, 3, 4)
    input_ids = torch.randint(3, 500, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = input_ids.clone()
    labels[0, [0, 4, 7]] = -100  # no example predicts the next one's first token
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    assert_same_training_signal(plain, fast, batch)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_generation_with_kv_cache(model_type, precision, tiny_checkpoint, kernels_for, device):
    plain, fast = plain_and_fast(tiny_checkpoint(model_type), model_type, kernels_for(precision), device=device)
    batch = _padded_batch(length=6, device=device)
    settings = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                    do_sample=False, use_cache=True, pad_token_id=2)
    plain.eval(), fast.eval()
    with torch.no_grad():
        expected = plain.generate(**settings)
        got = fast.generate(**settings)
    assert got.shape == (2, 9)
    assert torch.equal(got, expected)


def test_eager_attention_and_right_padding(tiny_checkpoint):
    plain, fast = plain_and_fast(tiny_checkpoint("llama"), "llama", "16bit", attn_implementation="eager")
    assert fast.config._attn_implementation == "eager"
    assert_same_training_signal(plain, fast, _padded_batch(pad_left=False))


def test_lm_head_trained_through_modules_to_save(tiny_checkpoint):
    """PEFT wraps lm_head in a ModulesToSaveWrapper: the loss uses the trained copy, and its gradient matches."""
    import peft

    path = tiny_checkpoint("qwen2")  # untied lm_head
    models = []
    for fast in (False, True):
        base = _load(path, "16bit")
        if fast:
            apply_fast_path(base, spec_for("qwen2"))
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 modules_to_save=["lm_head"])
        torch.manual_seed(1)
        model = peft.get_peft_model(base, config)
        with torch.no_grad():  # make the trained copy differ from the original
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
        models.append(model)
    assert_same_training_signal(*models, _padded_batch())


def _adamw_steps(model, batches, steps, lr):
    """(per-step losses, final trainable weights) after `steps` AdamW steps cycling over `batches`."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_twenty_steps_match_plain_training(tiny_checkpoint, kernels_for):
    """llama 4-bit, AdamW: per-step losses and final LoRA weights agree (checkpointing: the padded-batch test)."""
    batches = [_padded_batch(pad_left=bool(i % 2), length=7 + 2 * i) for i in range(2)]
    (plain_losses, plain_weights), (fast_losses, fast_weights) = [
        _adamw_steps(model, batches, steps=20, lr=1e-2)
        for model in plain_and_fast(tiny_checkpoint("llama"), "llama", kernels_for("4bit"))]
    assert plain_losses[-2] < plain_losses[0] and plain_losses[-1] < plain_losses[1], plain_losses
    # fp32 differences of 1e-7 grow through 20 Adam steps (Adam divides by sqrt(v): tiny gradients move
    # weights by ~lr whatever their size); 1e-4 relative still catches any real difference (5e-2 per step).
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=0)
    for name, expected in plain_weights.items():
        torch.testing.assert_close(fast_weights[name], expected, rtol=1e-4, atol=1e-5, msg=name)


def test_from_pretrained_patches_and_other_models_stay_plain(tiny_checkpoint, caplog, monkeypatch):
    """from_pretrained applies the fast path (forced here: by default only on CUDA) on its instance only: a model
    loaded afterwards with plain transformers has its class forwards."""
    from transformers import AutoModelForCausalLM

    from fastlm import FastLanguageModel

    if not torch.cuda.is_available():
        monkeypatch.setenv(SWITCH, "auto")
        cpu_model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("gemma2"), max_seq_length=64,
                                                         load_in_16bit=True)
        assert not any(is_patched(m) for m in cpu_model.modules()), "on a CPU the default is plain transformers"
    monkeypatch.setenv(SWITCH, "1")
    with caplog.at_level(logging.INFO, logger="fastlm"):
        fast, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("gemma2"), max_seq_length=64,
                                                    load_in_16bit=True)
    assert any("fast path on Gemma2ForCausalLM: 9 norms, 2 MLPs, 2 attention modules, fused loss on" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    assert is_patched(fast) and is_patched(fast.model.layers[0].self_attn) and is_patched(fast.model.norm)
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gemma2"))
    for name, module in list(plain.named_modules()):
        assert "forward" not in vars(module) and not is_patched(module), f"{name} was patched"
    ids = torch.randint(3, 500, (1, 9))
    assert plain(input_ids=ids, labels=ids).logits is not None


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_bf16_parity_on_gpu(model_type, tiny_checkpoint):
    """bf16 on CUDA: the fast model's loss and LoRA gradients are no further from the fp32 model's than plain
    transformers' bf16 are.

    The loss (a scalar) is compared elementwise with a 2-ulp slack. Gradients are compared by the norm of the
    error: the two bf16 models round at different places (the fused kernels round once where eager rounds after
    every op; fused LoRA adds base and LoRA products in one fp32 GEMM accumulation where PEFT rounds each), and
    after a backward through every layer their error vectors are different draws of the same size, so at single
    elements either one can be near zero by chance (run 4 saw elementwise ratios up to 6 at such elements).
    The norm of the error is what "as accurate as PyTorch's own bf16" means for a whole-model gradient; a fast
    path that loses accuracy (a bf16 accumulation, a dropped term) raises it by far more than the 1.3x allowed
    here for two equally accurate but differently rounded computations (the H200, run 7: the largest ratio over
    all LoRA tensors per family was 1.02-1.09, gemma2 1.20)."""
    from tests.kernels.check import ULP, assert_no_worse_than_reference

    path = tiny_checkpoint(model_type)
    runs = {}
    for name, dtype, patched in (("exact", torch.float32, False), ("plain", torch.bfloat16, False),
                                 ("fast", torch.bfloat16, True)):
        plain, fast = plain_and_fast(path, model_type, "16bit", device="cuda")
        model = (fast if patched else plain).to(dtype)
        batch = _padded_batch(device="cuda")
        runs[name] = _loss_and_grads(model, batch)
    loss = {name: run[0].loss.reshape(1).float() for name, run in runs.items()}
    assert_no_worse_than_reference(loss["fast"], loss["plain"], loss["exact"],
                                   atol=2 * ULP[torch.bfloat16] * loss["exact"].abs().item(), name="loss")
    worst = []
    for name, exact in runs["exact"][1].items():
        exact = exact.double()
        fast_err = (runs["fast"][1][name].double() - exact).norm().item()
        plain_err = (runs["plain"][1][name].double() - exact).norm().item()
        worst.append((fast_err / max(plain_err, 1e-30), name, fast_err / exact.norm().item(),
                      plain_err / exact.norm().item()))
    worst.sort(reverse=True)
    print(f"bf16-parity {model_type}: " + "; ".join(f"{n} ratio {r:.2f} (fast {f:.2e}, plain {p:.2e})"
                                                   for r, n, f, p in worst[:3]))
    ratio, name, fast_rel, plain_rel = worst[0]
    assert ratio <= 1.3, (f"{name}: bf16 gradient error (norm) {fast_rel:.3g} of the exact gradient's norm vs "
                           f"plain transformers + PEFT's {plain_rel:.3g}")


def test_semantics_that_differ_stay_plain_and_bad_input(tiny_checkpoint, monkeypatch):
    """A norm whose class computes something else than the spec says is probed and left alone; misuse raises."""
    import dataclasses

    from fastlm.patching import fast_path_wanted

    model = _load(tiny_checkpoint("llama"), "16bit")
    report = apply_fast_path(model, dataclasses.replace(spec_for("llama"), norm="rms_gemma"))
    assert report["norms"] == 0 and sum("LlamaRMSNorm differs" in s for s in report["skipped"]) == 5
    assert not is_patched(model.model.norm) and is_patched(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="the spec describes 'qwen2'"):
        apply_fast_path(model, spec_for("qwen2"))
    with pytest.raises(TypeError, match="before get_peft_model"):
        apply_fast_path(_with_lora(model, "llama"), spec_for("llama"))
    monkeypatch.setenv(SWITCH, "yes")
    with pytest.raises(ValueError, match="FASTLM_FAST_PATH must be 1, 0 or auto"):
        fast_path_wanted(model)


@pytest.mark.slow
def test_smollm2_qlora_steps_match_plain(smollm2_dir, kernels_for):
    """The real SmolLM2-135M (tied embeddings, 9 query / 3 KV heads of 64), three AdamW steps on text.

    fp32 and, on CPU, the kernels' references: the interpreter (and bitsandbytes' CPU NF4) would take minutes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tokenizer(["The capital of France is Paris.", "Two plus two is four, and three plus three is six."],
                      padding=True, return_tensors="pt")
    batch = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "labels": batch.input_ids.masked_fill(batch.attention_mask == 0, -100)}
    (plain_losses, plain_weights), (fast_losses, fast_weights) = [
        _adamw_steps(model, [batch], steps=3, lr=1e-3)
        for model in plain_and_fast(smollm2_dir, "llama", kernels_for("16bit", references=True))]
    assert plain_losses[2] < plain_losses[0]
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    for name, expected in plain_weights.items():
        torch.testing.assert_close(fast_weights[name], expected, rtol=1e-4, atol=1e-6, msg=name)
