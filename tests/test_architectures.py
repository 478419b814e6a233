"""Every supported architecture, tiny and random: loads at every precision, gets LoRA, and trains."""
import pytest
import torch

from fastlm import FastLanguageModel
from tests.fixtures.tiny_models import SUPPORTED_TYPES, expected_lora_parameters

MODES = {"4bit": {}, "8bit": {"load_in_8bit": True}, "16bit": {"load_in_16bit": True},
         "full": {"full_finetuning": True}}


def _quantized_layer_type(model):
    return type(model.get_decoder().layers[0].mlp.down_proj).__name__


def _train_three_steps(model, tokenizer):
    batch = tokenizer(["Paris is the capital of France.", "One, two, three, four."], padding=True,
                      return_tensors="pt").to(model.device)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("model_type", SUPPORTED_TYPES)
def test_load_lora_and_train(model_type, mode, tiny_checkpoint):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint(model_type), max_seq_length=64,
                                                         **MODES[mode])
    assert model.config.model_type == model_type
    assert model.max_seq_length == 64 and tokenizer.model_max_length == 64
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    expected_layer = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}.get(mode, "Linear")
    assert _quantized_layer_type(model) == expected_layer
    # Embeddings and lm_head are never quantized.
    assert type(model.get_output_embeddings()).__name__ == "Linear"
    if mode == "4bit":
        weight = model.get_decoder().layers[0].mlp.down_proj.weight
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested, "NF4 with double quantization"

    peft_model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if mode == "full":
        assert peft_model is model
        assert trainable == sum(p.numel() for p in model.parameters())
    else:
        assert trainable == expected_lora_parameters(model_type, r=4)
        lora_b_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
        assert lora_b_before and all(torch.count_nonzero(b) == 0 for b in lora_b_before.values())

    losses = _train_three_steps(peft_model, tokenizer)
    assert losses[2] < losses[0], f"loss did not fall: {losses}"
    if mode != "full":
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                assert not torch.equal(param.detach(), lora_b_before[name]), f"{name} did not move"
