"""Gradient checkpointing modes on the H200 at Llama-3.2-1B shape: none, True (torch), "unsloth" (offloaded).

    python3 bench/offload_checkpointing.py --out $OUT [--modes none,true,unsloth] [--layers 16] [--steps 10]

Model: LlamaConfig at Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocab 128256, tied embeddings), seeded random weights built on the GPU in bf16, SDPA attention; PEFT LoRA r=16
alpha=16 dropout 0 on q,k,v,o,gate,up,down (fp32 adapters), AdamW lr 1e-4. Batch 4 x 2048 random tokens.
Each mode starts from the same LoRA weights and a fresh optimizer: 3 warm-up steps, then --steps timed steps.
Reported per mode: ms/step (mean of CUDA-event timings of whole steps: forward, backward, optimizer), tokens/s,
peak allocated and reserved GPU memory during the timed steps, pinned host memory (where torch reports it),
loss at the first and last timed step. Saved-activation memory a mode frees is `peak(none) - peak(mode)`; one
layer input is 4 x 2048 x 2048 x 2 B = 32 MiB, so offloading should save about 15 x 32 MiB more than True.
Writes offload_checkpointing.json and prints a table.
"""
import argparse
import json
import os
import time

import torch

from fastlm.training.checkpointing import set_gradient_checkpointing

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
             tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, WARMUP = 4, 2048, 3
MODES = {"none": False, "true": True, "unsloth": "unsloth"}


def build_model(layers: int):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.requires_grad_(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # lora_B starts at zero; make every adapter matter for the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model


def _pinned_host_stats():
    """torch's pinned host allocator counters (bytes), where this torch version reports them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    try:
        return {k: v for k, v in stats().items() if "bytes" in k} if stats is not None else None
    except RuntimeError:
        return None


def run_mode(model, initial_lora, batch, mode_name: str, steps: int) -> dict:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial_lora:
                param.copy_(initial_lora[name])
    set_gradient_checkpointing(model, MODES[mode_name])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    losses = []
    events[0].record()
    for i in range(steps):
        losses.append(step())
        events[i + 1].record()
    torch.cuda.synchronize()
    times = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    ms = sum(times) / steps
    del optimizer
    return dict(mode=mode_name, ms_per_step=ms, ms_min=min(times), ms_max=max(times),
                tokens_per_s=BATCH * SEQ / (ms / 1e3),
                peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                pinned_host=_pinned_host_stats(),
                loss_first=losses[0].item(), loss_last=losses[-1].item())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--modes", default="none,true,unsloth")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")

    import peft
    import transformers
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                peft=peft.__version__, batch=BATCH, seq=SEQ, layers=args.layers, steps=args.steps,
                warmup=WARMUP, shape=SHAPE, lora_r=16, time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    model = build_model(args.layers)
    meta["attn_implementation"] = model.config._attn_implementation
    initial_lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=generator).cuda()
    batch = dict(input_ids=ids, labels=ids)

    rows = []
    for mode_name in modes:
        torch.cuda.empty_cache()
        row = run_mode(model, initial_lora, batch, mode_name, args.steps)
        print(json.dumps(row), flush=True)
        rows.append(row)

    print(f"\n{'mode':8} {'ms/step':>9} {'tok/s':>9} {'peak alloc GiB':>15} {'peak reserved GiB':>18} "
          f"{'loss first':>11} {'loss last':>10}")
    for r in rows:
        print(f"{r['mode']:8} {r['ms_per_step']:9.1f} {r['tokens_per_s']:9.0f} {r['peak_allocated_gib']:15.2f} "
              f"{r['peak_reserved_gib']:18.2f} {r['loss_first']:11.4f} {r['loss_last']:10.4f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "offload_checkpointing.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
