"""from_pretrained's sources (local, sharded, hub cache, adapter, pre-quantized), dtypes, context length and
tokenizer fixes, on tiny random models."""
import os
import random
import shutil

import pytest
import torch

from fastlm import FastLanguageModel
from fastlm.loading.precision import resolve_dtype


def _logits(model, tokenizer, text="Paris is the capital of France."):
    batch = tokenizer(text, return_tensors="pt").to(model.device)
    with torch.no_grad():
        return model(**batch).logits


def test_sharded_checkpoint_equals_single(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    single = tiny_checkpoint("llama")
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(tmp_path, max_shard_size="50KB")
    AutoTokenizer.from_pretrained(single).save_pretrained(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    sharded, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), load_in_16bit=True)
    reference, _ = FastLanguageModel.from_pretrained(single, load_in_16bit=True)
    assert torch.equal(_logits(sharded, tokenizer), _logits(reference, tokenizer))


def _fake_hub_cache(root, repo_id, checkpoint, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lay out `checkpoint` as huggingface_hub's cache holds a downloaded snapshot of `repo_id` at `commit`."""
    repo_dir = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, os.path.join(repo_dir, "snapshots", commit))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    return commit


def test_hub_id_from_cache_offline_with_revision(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants
    commit = _fake_hub_cache(str(tmp_path), "fastlm-test/tiny-llama", tiny_checkpoint("llama"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, _ = FastLanguageModel.from_pretrained("fastlm-test/tiny-llama", load_in_16bit=True, token="hf_x")
    assert model.config.model_type == "llama"
    model, _ = FastLanguageModel.from_pretrained("fastlm-test/tiny-llama", revision=commit, load_in_16bit=True)
    assert model.config.model_type == "llama"
    with pytest.raises(OSError, match="revision 'v2'"):
        FastLanguageModel.from_pretrained("fastlm-test/tiny-llama", revision="v2", load_in_16bit=True)
    # The cache lookup used when a huggingface_hub release refuses a cached commit offline (1.33 does).
    from fastlm.loading.resolve import _cached_commit_snapshot
    assert _cached_commit_snapshot("fastlm-test/tiny-llama", commit) == os.path.join(
        str(tmp_path), "models--fastlm-test--tiny-llama", "snapshots", commit)
    assert _cached_commit_snapshot("fastlm-test/tiny-llama", "f" * 40) is None
    assert _cached_commit_snapshot("fastlm-test/tiny-llama", "main") is None


def test_revision_on_local_path_warns(tiny_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="fastlm"):
        FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True, revision="v1")
    assert any("revision='v1' applies to hub ids only" in r.getMessage() for r in caplog.records)


def test_adapter_directory_loads_base_and_trainable_adapter(tiny_checkpoint, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("qwen3"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4)
    with torch.no_grad():  # make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model.eval()
    expected = _logits(model, tokenizer)

    loaded, loaded_tokenizer = FastLanguageModel.from_pretrained(str(tmp_path), load_in_16bit=True)
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" not in n)
    loaded.eval()
    torch.testing.assert_close(_logits(loaded, loaded_tokenizer), expected)
    assert FastLanguageModel.get_peft_model(loaded, r=4) is loaded  # same adapter settings: unchanged


def test_prequantized_checkpoint_loads_as_is(tiny_checkpoint, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"))  # NF4
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = _logits(model, tokenizer)
    for flags in ({}, {"load_in_8bit": False}):
        again, _ = FastLanguageModel.from_pretrained(str(tmp_path), **flags)
        assert type(again.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        torch.testing.assert_close(_logits(again, tokenizer), expected)
    with pytest.raises(ValueError, match="already quantized to 4bit"):
        FastLanguageModel.from_pretrained(str(tmp_path), load_in_16bit=True)


@pytest.mark.parametrize("dtype, expected", [(None, resolve_dtype(None, torch.cuda.is_available())),
                                             ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), (torch.bfloat16, torch.bfloat16),
                                             ("float32", torch.float32)])
def test_dtype(tiny_checkpoint, dtype, expected):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), dtype=dtype, load_in_16bit=True)
    assert model.dtype == expected
    model4, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), dtype=dtype)
    assert model4.config.quantization_config.bnb_4bit_compute_dtype == expected


def test_dtype_none_prefers_bf16_on_gpu():
    assert resolve_dtype(None, on_cuda=False) == torch.float32
    if torch.cuda.is_available():
        assert resolve_dtype(None, on_cuda=True) == (torch.bfloat16 if torch.cuda.is_bf16_supported()
                                                      else torch.float16)


def test_full_finetuning_float32_mixed_precision(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), full_finetuning=True, dtype="bfloat16",
                                                 float32_mixed_precision=True)
    assert model.dtype == torch.float32 and all(p.requires_grad for p in model.parameters())
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), full_finetuning=True, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing


def test_long_context_stretches_rope(tiny_checkpoint, caplog):
    with caplog.at_level("WARNING", logger="fastlm"):
        model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), max_seq_length=1024,
                                                             load_in_16bit=True)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 1024 / 256
    assert model.config.max_position_embeddings == 1024 and tokenizer.model_max_length == 1024
    assert any("stretched linearly by 4x" in r.getMessage() for r in caplog.records)

    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), max_seq_length=128, load_in_16bit=True,
                                                 rope_scaling={"type": "dynamic", "factor": 2.0})
    assert model.config.rope_parameters["rope_type"] == "dynamic" and model.config.rope_parameters["factor"] == 2.0
    short, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), max_seq_length=128, load_in_16bit=True)
    assert short.config.rope_parameters["rope_type"] == "default"


def test_long_context_gemma3_scales_full_attention_only(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("gemma3_text"), max_seq_length=512,
                                                 load_in_16bit=True)
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "default"


def _checkpoint_with_tokenizer(tiny_checkpoint, tmp_path, edit):
    from transformers import AutoTokenizer
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    edit(tokenizer)
    tokenizer.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_pad_equal_to_eos_is_replaced_by_spare_token(tiny_checkpoint, tmp_path):
    def pad_is_eos(tokenizer):
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_0|>"]})
        tokenizer.pad_token = tokenizer.eos_token
    path = _checkpoint_with_tokenizer(tiny_checkpoint, tmp_path, pad_is_eos)
    model, tokenizer = FastLanguageModel.from_pretrained(path, load_in_16bit=True)
    assert tokenizer.pad_token == "<|reserved_special_token_0|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_no_spare_token_adds_pad_and_resizes(tiny_checkpoint, tmp_path):
    def no_unk(tokenizer):
        tokenizer.unk_token = None
    path = _checkpoint_with_tokenizer(tiny_checkpoint, tmp_path, no_unk)
    model, tokenizer = FastLanguageModel.from_pretrained(path, load_in_16bit=True)
    assert tokenizer.pad_token == "<|fastlm_pad|>"
    assert tokenizer.pad_token_id < model.get_input_embeddings().num_embeddings
    untouched, tokenizer = FastLanguageModel.from_pretrained(path, load_in_16bit=True, fix_tokenizer=False)
    assert tokenizer.pad_token is None


def test_chat_template_kept(tiny_checkpoint, tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

    def with_template(tokenizer):
        tokenizer.chat_template = template
    path = _checkpoint_with_tokenizer(tiny_checkpoint, tmp_path, with_template)
    _, tokenizer = FastLanguageModel.from_pretrained(path, load_in_16bit=True)
    assert tokenizer.chat_template == template


def test_resize_model_vocab(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True, resize_model_vocab=640)
    assert model.get_input_embeddings().num_embeddings == 640
    assert model.get_output_embeddings().out_features == 640


def test_random_state_seeds_everything(tiny_checkpoint):
    draws = []
    for _ in range(2):
        FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True, random_state=11)
        draws.append((random.random(), float(torch.rand(1))))
    assert draws[0] == draws[1]


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto", "sequential"])
def test_device_map_on_cpu(tiny_checkpoint, device_map):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True, device_map=device_map)
    assert model.device.type == ("cuda" if torch.cuda.is_available() and device_map != "cpu"
                                 and device_map != {"": "cpu"} else "cpu")


def test_unknown_architecture_suggests_trust_remote_code(tiny_checkpoint, tmp_path):
    import json
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "custom")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    config["model_type"] = "my_custom_lm"
    (tmp_path / "custom" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        FastLanguageModel.from_pretrained(str(tmp_path / "custom"))


def test_extra_kwargs_reach_transformers(tiny_checkpoint):
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True,
                                                 attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_for_inference_and_for_training(tiny_checkpoint):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing and tokenizer.padding_side == "right"
    FastLanguageModel.for_inference(model)
    assert not model.training and not base.is_gradient_checkpointing and base.config.use_cache
    assert tokenizer.padding_side == "left"
    prompts = tokenizer(["Paris is", "One, two, three"], padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**prompts,
                         max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3
    FastLanguageModel.for_training(model)
    assert model.training and base.is_gradient_checkpointing and tokenizer.padding_side == "right"
