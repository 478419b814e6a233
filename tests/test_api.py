"""The public API mirrors Unsloth's FastLanguageModel argument for argument (names, order and defaults); fastlm's own
additions are keyword-only, after Unsloth's parameters and *args, so no positional call means something else."""
import inspect

import pytest

import fastlm
from fastlm import FastLanguageModel

FROM_PRETRAINED = [
    ("model_name", "unsloth/Llama-3.2-1B-Instruct"), ("max_seq_length", 2048), ("dtype", None),
    ("load_in_4bit", True), ("load_in_8bit", False), ("load_in_16bit", False), ("full_finetuning", False),
    ("token", None), ("device_map", "sequential"), ("rope_scaling", None), ("fix_tokenizer", True),
    ("trust_remote_code", False), ("use_gradient_checkpointing", "unsloth"), ("resize_model_vocab", None),
    ("revision", None), ("use_exact_model_name", False), ("offload_embedding", False),
    ("float32_mixed_precision", None), ("fast_inference", False), ("gpu_memory_utilization", 0.5),
    ("float8_kv_cache", False), ("random_state", 3407), ("max_lora_rank", 64), ("disable_log_stats", True),
    ("qat_scheme", None), ("load_in_fp8", False), ("unsloth_tiled_mlp", False)]
FROM_PRETRAINED_FASTLM_ONLY = [("offload_lm_head", False)]
GET_PEFT_MODEL = [
    ("r", 16), ("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("lora_alpha", 16), ("lora_dropout", 0), ("bias", "none"), ("use_gradient_checkpointing", "unsloth"),
    ("random_state", 3407), ("use_rslora", False), ("loftq_config", None), ("modules_to_save", None)]


def _named(signature, kinds=(inspect.Parameter.POSITIONAL_OR_KEYWORD,)):
    return [(p.name, p.default) for p in signature.parameters.values() if p.kind in kinds]


def test_from_pretrained_signature():
    signature = inspect.signature(FastLanguageModel.from_pretrained)
    assert _named(signature) == FROM_PRETRAINED
    assert _named(signature, (inspect.Parameter.KEYWORD_ONLY,)) == FROM_PRETRAINED_FASTLM_ONLY
    kinds = [p.kind for p in signature.parameters.values()]
    assert kinds[len(FROM_PRETRAINED)] == inspect.Parameter.VAR_POSITIONAL  # right after Unsloth's parameters
    assert kinds[-1] == inspect.Parameter.VAR_KEYWORD


def test_get_peft_model_signature():
    signature = inspect.signature(FastLanguageModel.get_peft_model)
    assert _named(signature) == [("model", inspect.Parameter.empty)] + GET_PEFT_MODEL


def test_public_names():
    assert fastlm.__all__ == ["FastLanguageModel", "__version__"]
    assert callable(FastLanguageModel.for_inference) and callable(FastLanguageModel.for_training)


def _run_after_import(env_update: dict, code: str) -> str:
    """The last line printed by `code` in a fresh interpreter, the allocator variables of this process's
    environment replaced by env_update."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env.update(env_update)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_import_sets_expandable_segments_unless_the_user_set_the_allocator():
    """`import fastlm` asks for expandable segments where neither allocator variable is set, and leaves a user's
    setting (either name) alone."""
    code = "import os, fastlm; print(os.environ.get('PYTORCH_ALLOC_CONF'))"
    assert _run_after_import({}, code) == fastlm.ALLOCATOR_SETTINGS == "expandable_segments:True"
    assert _run_after_import({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, code) == "expandable_segments:False"
    assert _run_after_import({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}, code) == "None"


@pytest.mark.gpu
def test_gpu_memory_comes_in_expandable_segments_after_import():
    """torch takes the setting at the first CUDA allocation, also when it was imported and used on the CPU before
    fastlm was imported; without fastlm the segments are not expandable (what makes this test able to fail)."""
    code = ("import torch; torch.zeros(3).sum(); {}x = torch.zeros(1 << 20, device='cuda'); "
            "print([s.get('is_expandable') for s in torch.cuda.memory_snapshot()])")
    assert _run_after_import({}, code.format("import fastlm; ")) == "[True]"
    assert _run_after_import({}, code.format("")) == "[False]"
