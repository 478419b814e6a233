"""Fused LoRA vs PEFT's path at Llama-3.1-8B layer shapes on the H200: MLP, q/k/v and o_proj, fwd+bwd.

    python3 bench/fused_lora.py --out $OUT

Shapes: hidden 4096, intermediate 14336, 32 query / 8 key-value heads of 128; 8192 tokens (1 x 8192), bf16
activations, LoRA r=16 alpha 16 with fp32 adapters (as fastlm's get_peft_model makes them); bases bf16 and
NF4 (bitsandbytes Linear4bit, double-quantized, bf16 compute). Real transformers modules (LlamaMLP,
LlamaAttention) wrapped by peft.get_peft_model, then the same instances after install_fused_lora.

For each (base, op): PEFT without autocast, PEFT under torch.autocast(bf16) (what the HF Trainer does with
bf16=True), and fastlm fused. Timed: forward + backward to x and every LoRA matrix (torch.autograd.grad with
random upstream gradients), median ms (triton.testing.do_bench); peak MiB above what was allocated before
(bench.common.peak_mib). The note gives the fused output's max error relative to PEFT's largest |y|.
Writes fused_lora.json and fused_lora.md to --out.
"""
import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import peak_mib, time_ms  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, TOKENS, RANK = 4096, 14336, 32, 8, 128, 8192, 16
DEVICE = "cuda"  # a CPU smoke run of _build/_ops sets this to "cpu"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Block(torch.nn.Module):
    """One Llama layer's attention projections and MLP (no attention math: only the LoRA'd matmuls)."""

    def __init__(self, config):
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx=0)
        self.mlp = LlamaMLP(config)


def _quantize_nf4(block) -> None:
    """Swap every projection for a bitsandbytes NF4 Linear4bit holding the same weight (quantized on .cuda())."""
    import bitsandbytes as bnb

    for parent in (block.self_attn, block.mlp):
        for name in PROJECTIONS:
            linear = getattr(parent, name, None)
            if linear is None:
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
            setattr(parent, name, q.to(DEVICE))


def _build(base: str):
    import peft
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, num_hidden_layers=1, hidden_act="silu")
    torch.manual_seed(0)
    block = _Block(config).to(torch.bfloat16)
    if base == "nf4":
        _quantize_nf4(block)
        block.is_loaded_in_4bit = True  # PEFT picks its bitsandbytes LoRA layers from this attribute
    block.to(DEVICE)
    for param in block.parameters():
        param.requires_grad_(False)
    lora = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)
    model = peft.get_peft_model(block, lora, autocast_adapter_dtype=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; random B makes every gradient non-trivial
            torch.nn.init.normal_(param, std=0.02)
    return model


def _ops(model):
    """name -> (function of x returning outputs, its input width, the LoRA parameters it trains)."""
    block = model.get_base_model()
    attn, mlp = block.self_attn, block.mlp

    def lora_of(*modules):
        return [p for m in modules for n, p in m.named_parameters() if p.requires_grad]

    def qkv(x):
        project = getattr(attn, "fastlm_project_qkv", None)
        return project(x) if project is not None else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))

    return {"mlp": (lambda x: (mlp(x),), HIDDEN, lora_of(mlp)),
            "qkv": (qkv, HIDDEN, lora_of(attn.q_proj, attn.k_proj, attn.v_proj)),
            "o_proj": (lambda x: (attn.o_proj(x),), HEADS * HEAD_DIM, lora_of(attn.o_proj))}


def _measure(record, base, op, variant, fn, width, params, autocast, reference):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, TOKENS, width, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    context = torch.autocast(DEVICE, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        outs = fn(x)
    ups = [torch.randn(o.shape, device=DEVICE, dtype=o.dtype, generator=gen) for o in outs]

    def step():
        with context:
            ys = fn(x)
        return torch.autograd.grad(ys, [x] + params, ups)

    step()
    note = ""
    if reference is not None:
        err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(outs, reference))
        note = f"max |y - y_peft| / max |y_peft| = {err:.2e}"
    ms, peak = time_ms(step), peak_mib(step)
    record(f"{op} ({base} base)", variant, ms, peak, note)
    return [o.detach() for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    from fastlm.training.fused_lora import install_fused_lora

    rows = []

    def record(op, variant, ms, peak, note=""):
        row = dict(op=op, variant=variant, ms=round(ms, 3), peak_mib=round(peak, 1), note=note)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for base in ("bf16", "nf4"):
        try:
            model = _build(base)
        except Exception as exc:  # e.g. bitsandbytes missing: report and go on
            record(f"all ({base} base)", "FAILED", float("nan"), float("nan"), repr(exc)[:300])
            continue
        references = {}
        for op, (fn, width, params) in _ops(model).items():
            references[op] = _measure(record, base, op, "peft", fn, width, params, False, None)
            _measure(record, base, op, "peft + autocast bf16", fn, width, params, True, references[op])
        print(install_fused_lora(model), flush=True)
        for op, (fn, width, params) in _ops(model).items():
            _measure(record, base, op, "fastlm fused", fn, width, params, False, references[op])
        del model, references
        torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, tokens=TOKENS, rank=RANK)
    with open(os.path.join(args.out, "fused_lora.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"{meta}", "", "| op | variant | ms fwd+bwd | peak MiB | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['variant']} | {r['ms']} | {r['peak_mib']} | {r['note']} |" for r in rows]
    with open(os.path.join(args.out, "fused_lora.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
