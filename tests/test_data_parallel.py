"""fastlm's GPU fast path under DistributedDataParallel (tests/fixtures/ddp_gpu.py): 2 ranks sharing GPU 0 through
gloo, and 2 ranks on 2 GPUs through NCCL where the machine has them.

On the CPU the Trainer's data-parallel path is tested in tests/test_training_exact.py (gloo ranks, exact token
counts). Here the model is what a GPU user trains: 4-bit NF4, fused LoRA, offloaded checkpointing with CUDA-graphed
layers, optionally the embedding and lm_head in host memory; 3 SGD steps over two ranks must equal the same steps
in one process that accumulates both halves. fp32 compute: the two differ only in the order the halves' gradients
are summed (the all-reduce against accumulation in .grad) and in which calls replay a CUDA graph rather than
run eagerly (the same kernels), a few fp32 ulps: relative 1e-5 of each tensor's largest entry (the fp32 rule of
the other parity tests) is ample, while a rank that trained on its own half only, or a gradient DDP never
all-reduced, is off by tens of percent.
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.fixtures.compare import assert_same_loss_and_grads
from tests.fixtures.ddp_gpu import halves, load, train

WORKER = os.path.join(os.path.dirname(__file__), "fixtures", "ddp_gpu.py")


def _ddp_run(path: str, out_dir, backend: str, offloads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           WORKER, path, str(out_dir), backend, *offloads], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(os.path.join(out_dir, "result.pt"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [
    "gloo",  # both ranks on GPU 0
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across GPUs needs 2")),
])
@pytest.mark.parametrize("model_type, offloads", [
    ("llama", ()),
    ("llama", ("offload_embedding", "offload_lm_head")),
    ("gemma", ("offload_lm_head",)),  # tied: the one matrix in host memory
])
def test_gpu_ddp_steps_equal_one_process(tiny_checkpoint, tmp_path, model_type, offloads, backend):
    path = tiny_checkpoint(model_type)
    ranks = _ddp_run(path, tmp_path, backend, offloads)
    model, pad_token_id = load(path, offloads)
    batches, total = halves(model.config.vocab_size, pad_token_id)
    one = train(model, batches, total)
    assert len(ranks["losses"]) == len(one["losses"]) > 1
    for step, (loss_ranks, loss_one) in enumerate(zip(ranks["losses"], one["losses"])):
        assert loss_ranks == pytest.approx(loss_one, rel=1e-5), f"step {step}"
    first = torch.tensor(one["losses"][0])
    assert_same_loss_and_grads((first, one["grads"]), (first, ranks["grads"]), rtol=1e-5, what="first step")
    assert ranks["weights"].keys() == one["weights"].keys()
    for name, weight in one["weights"].items():
        torch.testing.assert_close(ranks["weights"][name], weight, rtol=1e-5, atol=1e-5 * weight.abs().max().item(),
                                   msg=lambda text, name=name: f"{name} after {len(one['losses'])} steps\n{text}")
