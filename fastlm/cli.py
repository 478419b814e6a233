"""The `fastlm` command.

    fastlm [finetune] [--max-steps N ...]   the default job: QLoRA fine-tune of SmolLM2-135M-Instruct on the
                                            bundled data, with held-out accuracy before and after
    fastlm env                              versions and hardware, for bug reports
"""
import argparse
import dataclasses
import platform
import sys

from fastlm.training.finetune import FinetuneConfig


def _finetune_parser(sub) -> None:
    parser = sub.add_parser("finetune", help="fine-tune (the default job)")
    for field in dataclasses.fields(FinetuneConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool or field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = {"int": int, "float": float}.get(getattr(field.type, "__name__", str(field.type)), str)
            parser.add_argument(flag, type=kind, default=field.default)


def env() -> None:
    import torch
    lines = [f"python {platform.python_version()} on {platform.platform()}", f"torch {torch.__version__}"]
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "triton", "safetensors", "trl"):
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
        lines.append("no CUDA GPU: training runs on the CPU")
    print("\n".join(lines))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fastlm", description="Fast, light fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command")
    _finetune_parser(sub)
    sub.add_parser("env", help="print versions and hardware")
    if not argv or argv[0].startswith("-"):
        argv = ["finetune"] + argv
    args = parser.parse_args(argv)
    if args.command == "env":
        env()
        return
    from fastlm.training.finetune import run
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    run(FinetuneConfig(**values))


if __name__ == "__main__":
    main()
