"""The `fastlm` command: the default job on a reduced setting, and `fastlm env`."""
import json
import os

import pytest

from fastlm.cli import main

pytestmark = pytest.mark.slow


def test_default_job_reduced(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--max-steps", "4", "--batch-size", "4", "--eval-examples", "2", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and "step    4/4" in printed
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "tokenizer.json"} <= set(
        os.listdir(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 4 and metrics["exact_match_after"] is not None
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["--max-steps", "1", "--output-dir", str(out)])


def test_env(capsys):
    main(["env"])
    printed = capsys.readouterr().out
    assert "torch" in printed and "transformers" in printed
