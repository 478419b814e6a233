"""Bad input gets a clear error naming the problem (and never a stack trace from deep inside torch)."""
import json
import os
import shutil

import pytest

from fastlm import FastLanguageModel


@pytest.fixture
def llama_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture
def llama_16bit(llama_dir):
    model, _ = FastLanguageModel.from_pretrained(llama_dir, load_in_16bit=True)
    return model


# ---- from_pretrained: where the model is --------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        FastLanguageModel.from_pretrained(str(tmp_path / "nowhere" / "model"))


def test_directory_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="no config.json.*notes.txt"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_corrupt_safetensors(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(OSError, match="model.safetensors' is damaged"):
        FastLanguageModel.from_pretrained(str(broken))
    weights.write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(OSError, match="is damaged"):
        FastLanguageModel.from_pretrained(str(broken))


def test_missing_weights_and_shards(llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(llama_dir, "config.json"), bare)
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        FastLanguageModel.from_pretrained(str(bare))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="missing weight shards.*model-00001-of-00002"):
        FastLanguageModel.from_pretrained(str(bare))


def test_corrupt_config(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(OSError, match="Cannot read .*config.json"):
        FastLanguageModel.from_pretrained(str(broken))


def test_hub_id_while_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="not in the local Hugging Face cache.*offline"):
        FastLanguageModel.from_pretrained("fastlm-test/surely-not-cached-model", token="hf_secret_token_value")


def test_hub_error_never_shows_token(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        FastLanguageModel.from_pretrained("fastlm-test/private", token="hf_secret_token_value")
    assert "hf_secret_token_value" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    vit.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'vit' model.*not a causal language model"):
        FastLanguageModel.from_pretrained(str(tmp_path))


def test_unsupported_causal_lm_loads_with_warning(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, OPTConfig
    from tests.fixtures.tiny_models import make_tokenizer
    config = OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="fastlm"):
        model, _ = FastLanguageModel.from_pretrained(str(tmp_path), load_in_16bit=True)
    assert type(model).__name__ == "OPTForCausalLM"
    warnings = [r.getMessage() for r in caplog.records if "no fast path" in r.getMessage()]
    assert len(warnings) == 1 and "'opt'" in warnings[0] and "\n" not in warnings[0]


# ---- from_pretrained: precision flags and other values -----------------------------------------------------------

@pytest.mark.parametrize("flags, names", [
    (dict(load_in_4bit=True, load_in_8bit=True), ("load_in_4bit", "load_in_8bit")),
    (dict(load_in_4bit=True, full_finetuning=True), ("load_in_4bit", "full_finetuning")),
    (dict(load_in_4bit=True, load_in_16bit=True), ("load_in_4bit", "load_in_16bit")),
    (dict(load_in_8bit=True, load_in_16bit=True), ("load_in_8bit", "load_in_16bit")),
    (dict(load_in_8bit=True, full_finetuning=True), ("load_in_8bit", "full_finetuning")),
])
def test_conflicting_precision_flags(llama_dir, flags, names):
    with pytest.raises(ValueError, match=f"{names[0]}=True and {names[1]}=True conflict"):
        FastLanguageModel.from_pretrained(llama_dir, **flags)


@pytest.mark.parametrize("dtype", ["float64", "int8", 3])
def test_bad_dtype(llama_dir, dtype):
    with pytest.raises((ValueError, TypeError), match="dtype"):
        FastLanguageModel.from_pretrained(llama_dir, dtype=dtype)


@pytest.mark.parametrize("argument, value", [
    ("fast_inference", True), ("load_in_fp8", True), ("load_in_fp8", "block"), ("qat_scheme", "int4"),
    ("float8_kv_cache", True)])
def test_features_not_built_yet(llama_dir, argument, value):
    with pytest.raises(NotImplementedError, match=argument):
        FastLanguageModel.from_pretrained(llama_dir, **{argument: value})


@pytest.mark.parametrize("kwargs, fast_path, pattern", [
    (dict(unsloth_tiled_mlp=True, full_finetuning=True), "1", "full fine-tuning does not use"),
    (dict(unsloth_tiled_mlp=True, load_in_16bit=True), "0", "FASTLM_FAST_PATH=1"),
    (dict(unsloth_tiled_mlp="yes"), "1", "unsloth_tiled_mlp must be True or False")])
def test_tiled_mlp_where_there_is_nothing_to_tile(llama_dir, kwargs, fast_path, pattern, monkeypatch):
    """unsloth_tiled_mlp=True works on fastlm's fused LoRA MLPs: without LoRA (full fine-tuning) or with the fast
    path off it would do nothing, so it raises, saying why."""
    monkeypatch.setenv("FASTLM_FAST_PATH", fast_path)
    with pytest.raises((ValueError, TypeError), match=pattern):
        FastLanguageModel.from_pretrained(llama_dir, **kwargs)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(max_seq_length=0), ValueError, "max_seq_length must be a positive integer"),
    (dict(max_seq_length="long"), ValueError, "max_seq_length"),
    (dict(use_gradient_checkpointing="sometimes"), ValueError, "use_gradient_checkpointing must be"),
    (dict(resize_model_vocab=-3), ValueError, "resize_model_vocab must be a positive integer"),
    (dict(rope_scaling="linear"), TypeError, "rope_scaling must be a dict"),
    (dict(rope_scaling={"factor": 2.0}), ValueError, "needs a 'rope_type'"),
    (dict(random_state="seed"), TypeError, "random_state must be an integer"),
    (dict(load_in_4bit="yes"), TypeError, "load_in_4bit must be True or False"),
    (dict(torch_dtype="float16"), ValueError, "fastlm sets it from its dtype argument"),
    (dict(quantization_config={}), ValueError, "fastlm sets it"),
])
def test_bad_values(llama_dir, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FastLanguageModel.from_pretrained(llama_dir, **kwargs)


def test_positional_extras_rejected(llama_dir):
    with pytest.raises(TypeError, match="positional"):
        FastLanguageModel.from_pretrained(llama_dir, 64, None, True, False, False, False, None, "sequential", None,
                                          True, False, "unsloth", None, None, False, False, None, False, 0.5, False,
                                          3407, 64, True, None, False, False, "extra")


def test_vllm_only_settings_warn(llama_dir, caplog):
    with caplog.at_level("WARNING", logger="fastlm"):
        FastLanguageModel.from_pretrained(llama_dir, load_in_16bit=True, gpu_memory_utilization=0.9)
    assert any("gpu_memory_utilization only applies to vLLM" in r.getMessage() for r in caplog.records)


# ---- get_peft_model ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(r=0), ValueError, "r must be > 0"),
    (dict(r=-4), ValueError, "r must be > 0"),
    (dict(r=2.5), TypeError, "r must be an integer"),
    (dict(lora_alpha=0), ValueError, "lora_alpha must be > 0"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be >= 0 and < 1"),
    (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
    (dict(bias="some"), ValueError, "bias must be one of none, all, lora_only"),
    (dict(target_modules=["q_proj", "attn_qkv"]), ValueError, r"\['attn_qkv'\] not found.*q_proj"),
    (dict(target_modules="everything"), ValueError, "all-linear"),
    (dict(target_modules=[]), ValueError, "target_modules is empty"),
    (dict(use_gradient_checkpointing="always"), ValueError, "use_gradient_checkpointing"),
    (dict(not_a_lora_field=1), TypeError, r"unexpected arguments \['not_a_lora_field'\]"),
    (dict(modules_to_save="lm_head"), TypeError, "modules_to_save must be a list"),
    (dict(task_type="SEQ_CLS"), ValueError, "task_type"),
])
def test_bad_peft_arguments(llama_16bit, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FastLanguageModel.get_peft_model(llama_16bit, **kwargs)


def test_existing_adapter_with_other_settings(llama_16bit):
    model = FastLanguageModel.get_peft_model(llama_16bit, r=4)
    assert FastLanguageModel.get_peft_model(model, r=4) is model  # the same settings: returned unchanged
    with pytest.raises(ValueError, match="already has a LoRA adapter with other settings"):
        FastLanguageModel.get_peft_model(model, r=8)


def test_loftq_on_quantized_model(llama_dir):
    model, _ = FastLanguageModel.from_pretrained(llama_dir)  # 4-bit
    with pytest.raises(ValueError, match="loftq_config.*load_in_16bit=True"):
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 4})
