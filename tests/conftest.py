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
