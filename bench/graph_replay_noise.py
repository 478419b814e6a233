"""How far a CUDA-graphed training run drifts from the eager one, and why (bench/RESULTS.md run 98).

    python3 bench/graph_replay_noise.py OUT_DIR

The tiny gemma2 of the tests (16-bit base, fp32, LoRA r=4 with random B, "unsloth" checkpointing), 4 AdamW steps
at lr 1e-2 (tests/test_layer_graphs.py's _train): eager twice and graphed once, for the padding mask dropped and
kept (causal_lm.DROP_PADDING_MASK) and SDPA on its default kernels or on math only. Prints and writes
graph_replay_noise.json: per case the largest difference over the LoRA weights, relative to each weight's largest
entry, eager vs eager and graphs vs eager. Needs a CUDA GPU.
"""
import json
import os
import sys
import tempfile

from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlm.models import causal_lm  # noqa: E402
from fastlm.training.layer_graphs import LayerGraphs  # noqa: E402
from tests.fixtures.tiny_models import save_tiny_model  # noqa: E402
from tests.test_layer_graphs import _lora_model, _train  # noqa: E402


def run(path: str, graphs: bool, drop: bool, math: bool):
    """(losses, LoRA weights) after _train's 4 steps."""
    causal_lm.DROP_PADDING_MASK = drop
    model = _lora_model(path, "16bit")
    if math:
        with sdpa_kernel([SDPBackend.MATH]):
            return _train(model, LayerGraphs() if graphs else None)
    return _train(model, LayerGraphs() if graphs else None)


def largest_difference(a, b) -> float:
    return max((a[1][n] - b[1][n]).abs().max().item() / b[1][n].abs().max().item() for n in b[1])


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    path = save_tiny_model("gemma2", tempfile.mkdtemp())
    results = {}
    for drop in (True, False):
        for math in (False, True):
            first, second = run(path, False, drop, math), run(path, False, drop, math)
            graphed = run(path, True, drop, math)
            key = f"drop={drop} math={math}"
            results[key] = dict(eager_vs_eager=largest_difference(second, first),
                                graphs_vs_eager=largest_difference(graphed, first))
            print(key, results[key], flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "graph_replay_noise.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
