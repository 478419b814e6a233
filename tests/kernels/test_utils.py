"""Host-side helpers shared by the row-wise kernels (fastlm/kernels/_utils.py)."""
import types

import torch

from fastlm.kernels import _utils


def test_residency_learned_after_one_tile_per_program_launch(monkeypatch):
    """A non-persistent launch reaches Residency.learn without Residency.grid having looked the device up
    (a KeyError on the H200, 2026-11-28): the properties are fetched there too. Runs on the CPU with
    a stand-in for the device properties and the compiled kernel."""
    props = types.SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                                  max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(_utils, "_props", {})
    residency = _utils.Residency()
    compiled = types.SimpleNamespace(n_regs=40, metadata=types.SimpleNamespace(shared=64))
    residency.learn(("k",), compiled, 8, torch.device("cuda", 0))
    assert residency.per_sm[("k",)] == 6  # 65536 registers // (40 x 32 = 1280 per warp x 8 warps)
    assert residency.grid(("k",), 10_000, 8, torch.device("cuda", 0)) == 132 * 6
    assert residency.grid(("k",), 10_000, 8, torch.device("cuda", 0), persistent=False) == 10_000
