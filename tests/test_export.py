"""model.save_pretrained_merged (fastlm/export/merge.py): the merged checkpoint loads with plain transformers and
computes what the LoRA model computes; "lora" writes PEFT's adapter; bad arguments and failed saves.
model.save_pretrained_gguf (fastlm/export/gguf.py): read back by transformers' GGUF loader."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastlm import FastLanguageModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"4bit": dict(load_in_4bit=True), "8bit": dict(load_in_8bit=True), "16bit": dict(load_in_16bit=True)}
# fp32 on the CPU: the merged layer computes x (W + s B A)^T where the LoRA model computes x W^T + s (x A^T) B^T, the
# same sums reassociated (K <= 128 terms: ~1e-6 relative). A missing or doubled LoRA term moves the logits by more
# than 1e-2 (each test checks that premise), NF4 / int8 weights read other than as bitsandbytes reads them by more.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _lora_model(checkpoint, mode="16bit", targets=TARGETS, **lora):
    # On the CPU in fp32 also on a GPU machine (test_gpu_... covers CUDA). max_seq_length within the tiny configs'
    # 256 positions: no RoPE stretching, so the checkpoint as saved is the model's base (the "lora" test loads it;
    # Phi-3's config accepts no linear stretch on reload)
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=256, dtype=torch.float32,
                                                         device_map="cpu", **MODES[mode])
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=targets, **lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: give every adapter an update that shows in the logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval(), tokenizer


def _logits(model, tokenizer):
    batch = tokenizer(["Paris is the capital of France.", "One, two, three."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def _without_adapters(model, tokenizer):
    with model.disable_adapter():
        return _logits(model, tokenizer)


def _reloaded(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _saved_layers(model, tokenizer, directory):
    """Save merged; per LoRA layer (name, its saved weight, bitsandbytes' fp32 reading of the NF4 / int8 base,
    (B @ A) * scaling in fp32)."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    model.save_pretrained_merged(str(directory), tokenizer)
    saved = load_file(str(directory / "model.safetensors"))
    layers = []
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A"):
            weight = layer.get_base_layer().weight
            if getattr(weight, "quant_state", None) is not None:
                base = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
            else:
                base = weight.data.float() * (weight.SCB.float() / 127.0).unsqueeze(1)
            lora_a, lora_b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
            key = name.removeprefix("base_model.model.") + ".weight"
            layers.append((name, saved[key], base, (lora_b @ lora_a) * layer.scaling["default"]))
    assert len(layers) == 2 * len(TARGETS)
    return layers


@pytest.mark.parametrize("model_type, mode", [("llama", "16bit"), ("llama", "4bit"), ("phi3", "4bit"),
                                              ("qwen2", "16bit"), ("gemma2", "4bit")])
def test_merged_16bit_computes_what_the_lora_model_computes(tiny_checkpoint, tmp_path, model_type, mode):
    model, tokenizer = _lora_model(tiny_checkpoint(model_type), mode, targets="all-linear")
    expected = _logits(model, tokenizer)
    assert (expected - _without_adapters(model, tokenizer)).abs().max() > 1e-2, "premise: the adapters matter"
    model.save_pretrained_merged(str(tmp_path), tokenizer)

    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = _reloaded(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(model_type))
    assert set(merged.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(_logits(merged, tokenizer), expected, **TOLERANCE)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged")), "the model itself was merged"
    torch.testing.assert_close(_logits(model, tokenizer), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_merged_weights_are_the_dequantized_base_plus_the_update(tiny_checkpoint, tmp_path, mode):
    """Per layer, against bitsandbytes' own reading of the weight. (The 8-bit model's logits are no reference:
    LLM.int8 also rounds the activations to int8, ~2e-3 here.)"""
    model, tokenizer = _lora_model(tiny_checkpoint("llama"), mode)
    for name, saved, base, update in _saved_layers(model, tokenizer, tmp_path):
        # fp32 both ways: the base read the same way, the same update added
        torch.testing.assert_close(saved, base + update, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gemma", "llama"])  # tied and untied embeddings
def test_trained_embeddings_are_saved_and_ties_kept(tiny_checkpoint, tmp_path, model_type):
    model, tokenizer = _lora_model(tiny_checkpoint(model_type), "4bit", targets=TARGETS + ["embed_tokens", "lm_head"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:  # the trained copies (tied: one tensor for both)
                param.add_(0.05)
    expected = _logits(model, tokenizer)
    model.save_pretrained_merged(str(tmp_path), tokenizer)
    merged = _reloaded(tmp_path)
    assert merged.config.tie_word_embeddings == (model_type == "gemma")
    torch.testing.assert_close(_logits(merged, tokenizer), expected, **TOLERANCE)


def test_merged_4bit_forced_holds_the_nf4_quantization_of_the_merged_weights(tiny_checkpoint, tmp_path):
    """Reloaded by plain transformers, in 4-bit from the saved quantization_config: each linear weight reads back
    as bitsandbytes' NF4 quantization of the merged_16bit weight, exactly."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    model, tokenizer = _lora_model(tiny_checkpoint("llama"), "4bit")
    model.save_pretrained_merged(str(tmp_path / "16"), tokenizer)
    model.save_pretrained_merged(str(tmp_path / "4"), tokenizer, save_method="merged_4bit_forced")
    merged = load_file(str(tmp_path / "16" / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "4"), dtype=torch.float32, device_map="cpu")
    assert reloaded.eval().config.quantization_config.load_in_4bit
    linears = [(n, m) for n, m in reloaded.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(linears) == 2 * len(TARGETS)
    for name, module in linears:
        weight = module.weight
        expected = bnbf.dequantize_4bit(*bnbf.quantize_4bit(merged[name + ".weight"], quant_type="nf4",
                                                            compress_statistics=True))
        assert torch.equal(bnbf.dequantize_4bit(weight.data, weight.quant_state), expected), name
    assert _logits(reloaded, tokenizer).isfinite().all()


def test_lora_method_saves_peft_adapter(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    model, tokenizer = _lora_model(tiny_checkpoint("llama"))
    model.save_pretrained_merged(str(tmp_path), tokenizer, save_method="lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path))
    assert "model.safetensors" not in os.listdir(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")), tmp_path)
    torch.testing.assert_close(_logits(reloaded.eval(), tokenizer), _logits(model, tokenizer), **TOLERANCE)


def test_shards_and_a_later_single_file_save(tiny_checkpoint, tmp_path):
    model, tokenizer = _lora_model(tiny_checkpoint("llama"), "4bit")
    expected = _logits(model, tokenizer)
    model.save_pretrained_merged(str(tmp_path), tokenizer, max_shard_size="100KB")
    shards = sorted(n for n in os.listdir(tmp_path) if n.startswith("model-"))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)
    torch.testing.assert_close(_logits(_reloaded(tmp_path), tokenizer), expected, **TOLERANCE)

    model.save_pretrained_merged(str(tmp_path), tokenizer)  # one file now: the shards and the index go
    assert not any(n.startswith("model-") or n.endswith("index.json") for n in os.listdir(tmp_path))
    torch.testing.assert_close(_logits(_reloaded(tmp_path), tokenizer), expected, **TOLERANCE)


def test_a_failed_save_leaves_the_earlier_one_whole(tiny_checkpoint, tmp_path, monkeypatch):
    import safetensors.torch

    model, tokenizer = _lora_model(tiny_checkpoint("llama"))
    model.save_pretrained_merged(str(tmp_path), tokenizer, max_shard_size="100KB")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    save_file, calls = safetensors.torch.save_file, []

    def disk_full_at_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save_file(*args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_the_second_shard)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained_merged(str(tmp_path), tokenizer, max_shard_size="100KB")
    assert sorted(os.listdir(tmp_path)) == sorted(before), "files added or removed (a staging directory left?)"
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_other_ranks_write_nothing(tiny_checkpoint, tmp_path):
    model, tokenizer = _lora_model(tiny_checkpoint("llama"))
    model.save_pretrained_merged(str(tmp_path / "out"), tokenizer, is_main_process=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, error, words", [
    (dict(save_method="merged_8bit"), ValueError, "save_method must be one of"),
    (dict(save_method="merged_4bit"), ValueError, "merged_4bit_forced"),
    (dict(push_to_hub=True), NotImplementedError, "upload_folder"),
    (dict(token="hf_x"), TypeError, "token"),
    (dict(safe_serialization=False), NotImplementedError, "safetensors"),
    (dict(max_shard_size="lots"), ValueError, "max_shard_size"),
])
def test_bad_arguments_are_clear_errors(tiny_checkpoint, tmp_path, arguments, error, words):
    model, tokenizer = _lora_model(tiny_checkpoint("llama"))
    with pytest.raises(error, match=words):
        model.save_pretrained_merged(str(tmp_path / "out"), tokenizer, **arguments)
    assert not (tmp_path / "out").exists()


def test_unmergeable_cases_are_clear_errors(tiny_checkpoint, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), max_seq_length=256,
                                                         device_map="cpu", load_in_16bit=True)
    with pytest.raises(ValueError, match="needs a model with a LoRA adapter"):
        model.save_pretrained_merged(str(tmp_path / "a"), tokenizer, save_method="lora")
    dora, _ = _lora_model(tiny_checkpoint("llama"), use_dora=True)
    with pytest.raises(NotImplementedError, match="DoRA"):
        dora.save_pretrained_merged(str(tmp_path / "b"), tokenizer)
    assert os.listdir(tmp_path / "b") == []
    adapter_dir = tmp_path / "c"
    dora.save_pretrained_merged(str(adapter_dir), tokenizer, save_method="lora")
    with pytest.raises(ValueError, match="holds a PEFT adapter"):
        dora.save_pretrained_merged(str(adapter_dir), tokenizer)


def test_a_config_transformers_refuses_is_not_saved(tiny_checkpoint, tmp_path):
    """Phi-3's config accepts no linear RoPE stretch (max_seq_length 2048 over its 256 positions) on reloading."""
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("phi3"), max_seq_length=2048,
                                                         device_map="cpu", load_in_16bit=True)
    with pytest.raises(ValueError, match="would not load the merged model's config.json"):
        model.save_pretrained_merged(str(tmp_path), tokenizer)
    assert os.listdir(tmp_path) == []


def test_full_finetuning_model_saves_whole(tiny_checkpoint, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("qwen3"), max_seq_length=256,
                                                         dtype=torch.float32, device_map="cpu",
                                                         full_finetuning=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    expected = _logits(model.eval(), tokenizer)
    model.save_pretrained_merged(str(tmp_path), tokenizer)
    torch.testing.assert_close(_logits(_reloaded(tmp_path), tokenizer), expected, **TOLERANCE)


@pytest.mark.gpu
def test_gpu_merged_after_fast_path_training_with_host_offloads(tiny_checkpoint, tmp_path):
    """On CUDA, after training steps through fastlm's fast path (fused LoRA over NF4, offloaded checkpointing, CUDA
    graphs) with the embedding and lm_head in host memory: every merged weight is bitsandbytes' bf16 reading of the
    base plus the update, rounded once to bf16; the host-held lm_head is saved as loaded."""
    from safetensors.torch import load_file

    checkpoint = tiny_checkpoint("llama")
    model, tokenizer = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=256, dtype=torch.bfloat16,
                                                         offload_embedding=True, offload_lm_head=True)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=TARGETS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["Paris is the capital of France."] * 2, return_tensors="pt").to("cuda")
    model.train()
    for _ in range(3):
        model(**batch, labels=batch.input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, saved, base, update in _saved_layers(model, tokenizer, tmp_path):
        assert update.abs().max() > 0, "premise: training moved B"
        assert torch.equal(saved, (base + update).to(torch.bfloat16).cpu()), name
    saved = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], original["lm_head.weight"].to(torch.bfloat16))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        assert torch.isfinite(merged(**batch).logits).all()
    model.save_pretrained_merged(str(tmp_path / "4bit"), tokenizer, save_method="merged_4bit_forced")
    quantized = AutoModelForCausalLM.from_pretrained(str(tmp_path / "4bit")).eval()
    layer = quantized.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.is_cuda
    with torch.no_grad():
        assert torch.isfinite(quantized(**batch).logits).all()


# GGUF (fastlm/export/gguf.py). transformers' GGUF loader is the reader here; llama.cpp read the same files the
# same way by hand (scripts/gguf_llama_cpp_check.py, not in CI: llama-cpp-python compiles for minutes).
def _gguf_reload(path):
    from transformers import AutoTokenizer

    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


GGUF_TEXTS = ["Paris is the capital of France.", "It's 12345 o'clock!\n\n  Two  spaces,\ttabs and 3.14159."]


@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("qwen2", {}), ("mistral", {}),
                                                   ("qwen3", {"head_dim": 128})])  # transformers reads no head_dim
def test_gguf_f32_reads_back_as_the_lora_model(tmp_path, model_type, overrides):
    from tests.fixtures.tiny_models import save_tiny_model

    checkpoint = save_tiny_model(model_type, str(tmp_path / "base"), **overrides)
    model, tokenizer = _lora_model(checkpoint, "4bit")
    path = model.save_pretrained_gguf(str(tmp_path / "gguf"), tokenizer, quantization_method="f32")
    assert os.listdir(tmp_path / "gguf") == ["model.F32.gguf"]
    reloaded, gguf_tokenizer = _gguf_reload(path)
    for text in GGUF_TEXTS:
        assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), **TOLERANCE)


@pytest.mark.parametrize("method, type_name", [("f16", "F16"), ("bf16", "BF16"), ("fast_quantized", "Q8_0")])
def test_gguf_types_hold_the_f32_file_quantized(tiny_checkpoint, tmp_path, method, type_name):
    """Every tensor of the f16 / bf16 / q8_0 file is gguf-py's quantization of the f32 file's (checked above):
    matrices in the type, vectors (norms) in f32, byte for byte."""
    import gguf

    model, tokenizer = _lora_model(tiny_checkpoint("llama"), "4bit")
    reference = gguf.GGUFReader(model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="f32"))
    typed_path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method=method)
    assert typed_path == str(tmp_path / f"model.{type_name}.gguf")
    typed = gguf.GGUFReader(typed_path)
    exact = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reference.tensors}
    assert [t.name for t in typed.tensors] == list(exact)
    for tensor in typed.tensors:
        want_type = gguf.GGMLQuantizationType[type_name] if exact[tensor.name].ndim == 2 else \
            gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == want_type, tensor.name
        want = gguf.quants.quantize(exact[tensor.name], want_type)
        assert np.asarray(tensor.data).tobytes() == want.tobytes(), tensor.name


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_gguf_names_the_pre_tokenizer(tiny_checkpoint, tmp_path, pre):
    """Llama 3's and Qwen 2's splitting (digits by three or one by one), named as llama.cpp knows them; the GGUF
    tokenizer transformers builds from the name tokenizes as the original."""
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastlm.export.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT
    from tests.fixtures.tiny_models import VOCAB

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(GGUF_TEXTS * 20, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    model, _ = _lora_model(tiny_checkpoint("llama"))
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="f32")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == pre
    try:  # transformers >= 5.24 splits by the regex the name stands for; 5.17's GGUF loader ignores the name
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS  # noqa: F401
    except ImportError:
        pytest.skip("this transformers' GGUF tokenizer ignores tokenizer.ggml.pre (the name is checked above)")
    _, gguf_tokenizer = _gguf_reload(path)
    for text in GGUF_TEXTS:
        assert gguf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("case, error, words", [
    ("gemma", NotImplementedError, "GGUF export of gemma"),
    ("stretched rope", NotImplementedError, "RoPE scaling"),
    ("q4_k_m", NotImplementedError, "llama-quantize"),
    ("q3", ValueError, "quantization_method must be one of"),
    ("no tokenizer", TypeError, "needs the tokenizer"),
    ("push_to_hub", NotImplementedError, "upload_folder"),
    ("token", TypeError, "token"),
])
def test_gguf_errors_are_clear_and_write_nothing(tiny_checkpoint, tmp_path, case, error, words):
    if case == "stretched rope":  # max_seq_length 2048 over 256 positions: linear RoPE scaling
        model, tokenizer = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), device_map="cpu")
    else:
        model, tokenizer = _lora_model(tiny_checkpoint("gemma" if case == "gemma" else "llama"))
    arguments = {"q4_k_m": dict(quantization_method="q4_k_m"), "q3": dict(quantization_method="q3"),
                 "push_to_hub": dict(push_to_hub=True), "token": dict(token="hf_x")}.get(case, {})
    with pytest.raises(error, match=words):
        model.save_pretrained_gguf(str(tmp_path / "out"), None if case == "no tokenizer" else tokenizer, **arguments)
    assert not (tmp_path / "out").exists()
