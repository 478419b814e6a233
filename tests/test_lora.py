"""get_peft_model's options: embeddings, all-linear, PEFT's own LoraConfig fields, rsLoRA, LoftQ, dropout, bias."""
import pytest
import torch

from fastlm import FastLanguageModel
from tests.fixtures.tiny_models import HIDDEN, VOCAB


def _step(model, tokenizer, lr=1e-2):
    batch = tokenizer(["Paris is the capital of France."], return_tensors="pt").to(model.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = model(**batch, labels=batch.input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _trained(model, leaf):
    """The trainable copy of a fully trained module (PEFT's ModulesToSaveWrapper)."""
    for name, module in model.named_modules():
        if name.endswith(leaf) and hasattr(module, "modules_to_save"):
            return module.modules_to_save["default"]
    raise AssertionError(f"{leaf} is not trained fully")


@pytest.mark.parametrize("model_type", ["llama", "gemma"])  # untied and tied embeddings
def test_train_embeddings_in_fp32_on_16bit_model(tiny_checkpoint, model_type):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint(model_type), dtype="bfloat16")
    tied = model.config.tie_word_embeddings
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"])
    embed, head = _trained(model, "embed_tokens"), _trained(model, "lm_head")
    assert embed.weight.dtype == torch.float32 and head.weight.dtype == torch.float32
    assert embed.weight.requires_grad and head.weight.requires_grad
    before = embed.weight.detach().clone()
    expected = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) + (
        VOCAB * HIDDEN * (1 if tied else 2))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    losses = [_step(model, tokenizer) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert not torch.equal(embed.weight.detach(), before)
    if tied:
        assert embed.weight is head.weight or torch.equal(embed.weight, head.weight), "tied embeddings diverged"
    same = FastLanguageModel.get_peft_model(model, r=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"])
    assert same is model


def test_tied_model_training_only_lm_head_keeps_embeddings_tied(tiny_checkpoint):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("gemma"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "lm_head"])
    _step(model, tokenizer)
    embed, head = _trained(model, "embed_tokens"), _trained(model, "lm_head")
    assert torch.equal(embed.weight, head.weight)


def test_all_linear(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules="all-linear")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_config_fields_through_kwargs(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, layers_to_transform=[1], init_lora_weights="gaussian")
    with_lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "q_proj" in n]
    assert len(with_lora) == 1 and ".layers.1." in with_lora[0]
    assert model.peft_config["default"].init_lora_weights == "gaussian"


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 4 ** 0.5)])
def test_rslora_scaling(tiny_checkpoint, use_rslora, expected):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=16, use_rslora=use_rslora)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(expected)


def test_dropout_bias_and_modules_to_save(tiny_checkpoint):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_dropout=0.1, bias="all", modules_to_save=["norm"])
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.lora_dropout["default"].p == 0.1
    assert model.peft_config["default"].bias == "all"
    assert _trained(model, "model.norm").weight.requires_grad
    assert _step(model, tokenizer) > 0


def test_loftq_on_cpu_is_a_clear_error(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("the CPU-only error")
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    with pytest.raises(ValueError, match="loftq_config needs a CUDA GPU"):
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 4})


@pytest.mark.gpu
def test_loftq_on_16bit_model(tiny_checkpoint):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"],
                                             loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    assert model.peft_config["default"].init_lora_weights == "loftq"
    lora_b = model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.count_nonzero(lora_b) > 0, "LoftQ initialises B from the quantization residual"


def test_random_state_makes_adapters_reproducible(tiny_checkpoint):
    def lora_a(seed):
        model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
        model = FastLanguageModel.get_peft_model(model, r=4, random_state=seed)
        return model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()
    assert torch.equal(lora_a(1), lora_a(1))
    assert not torch.equal(lora_a(1), lora_a(2))


def test_phi3_split_names_map_to_fused_projections(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("phi3"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"qkv_proj", "gate_up_proj"}


def test_gradient_checkpointing_modes(tiny_checkpoint):
    from fastlm.training.checkpointing import checkpointing_module
    from fastlm.training.offload import OffloadedCheckpoint
    for mode, expected in ((True, True), ("unsloth", True), (False, False)):
        model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"))
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode)
        assert model.get_base_model().is_gradient_checkpointing is expected
        decoder, function = checkpointing_module(model)
        assert decoder is (model.get_base_model().model if expected else None)
        assert isinstance(function, OffloadedCheckpoint) is (mode == "unsloth")
        assert _step(model, tokenizer) > 0  # trains with a 4-bit frozen base either way


def test_4bit_gradients_unchanged_by_an_evaluation(tiny_checkpoint):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward the first time they run in
    eval mode; fastlm turns that off, so gradients after for_inference + for_training equal those before. Both are
    taken in training mode: a freshly loaded model is in eval mode, where transformers does not checkpoint and the
    batch keeps its length, while training on the GPU pads it to a length bucket (other GEMM shapes, so other bf16
    roundings: bench/RESULTS.md runs 72 and 76)."""
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"))
    model = FastLanguageModel.get_peft_model(model, r=4, init_lora_weights="gaussian")
    FastLanguageModel.for_training(model)
    batch = tokenizer(["Paris is the capital of France."], return_tensors="pt").to(model.device)

    def lora_grads():
        model.zero_grad()
        model(**batch, labels=batch.input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = lora_grads()
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        model(**batch)
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    FastLanguageModel.for_training(model)
    after = lora_grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)
