"""Training-step benchmark on the H200: fastlm vs transformers + PEFT (+ bitsandbytes), same weights, same batch,
same run (issue 4). Seeded random weights at a real shape are saved once to /tmp and loaded both ways.

    python3 bench/train_step.py --out $OUT [--shape 1b|8b] [--variants qlora,lora16] [--batch 4] [--seq 2048]

Per variant: 3 warm-up + N timed AdamW steps, LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, gradient
checkpointing, bf16 autocast. Reports tokens/s, ms/step, MFU (flops_per_token at the measured 790 TFLOP/s),
peak allocated/reserved GiB during training (loading's own peak apart; timed_*: the timed steps only, after the
warm-up steps in which fastlm captures its CUDA graphs), loss at step 0 and at the last step; with --back-to-back N
also the mean time of N more steps run in a row without the per-step synchronization (back_to_back_steps).
"""
import argparse
import cProfile
import gc
import importlib
import json
import os
import pstats
import sys
import time

from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
PEAK_BF16_TFLOPS = 790.0  # measured bf16 matmul rate of the H200 (../shared/device/README.md)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def import_fastlm_first(impls) -> None:
    """Import fastlm before anything touches the GPU where it is measured, as a user's script does (`from fastlm
    import FastLanguageModel` at the top): its allocator settings (fastlm.ALLOCATOR_SETTINGS) then apply from the
    first CUDA allocation. A process that runs only transformers + PEFT keeps torch's defaults."""
    if "fastlm" in impls:
        import fastlm  # noqa: F401


def make_checkpoint(shape: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    path = f"/tmp/fastlm-bench-{shape}"
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t1", pad_token="t2").save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def flops_per_token(config, seq: int) -> float:
    """Model FLOPs per token of one LoRA training step with full recomputation (the frozen base needs no weight
    gradient): decoder matmuls 2 forward + 2 recomputed + 2 input-gradient = 6 per parameter, lm_head 2 + 2 = 4;
    causal attention (QK^T and PV, half the square) 2 * seq * hidden per layer forward, x4 with recomputation and
    backward. LoRA's own FLOPs (r=16) are under 2% and not counted. At the 1B shape, seq 2048: 7.4 GFLOP/token,
    the count behind the 77 ms/step floor in ../shared/device/README.md."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    decoder_params = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    return 6 * decoder_params + 4 * h * config.vocab_size + 4 * layers * 2 * seq * h


def load(variant: str, path: str, fast: bool, offloads: dict = None, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if fast:
        from fastlm import FastLanguageModel
        model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=4096, dtype=dtype,
                                                     load_in_4bit=variant == "qlora",
                                                     load_in_16bit=variant != "qlora",
                                                     **(offloads or {}))
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                use_gradient_checkpointing="unsloth")
    import peft
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if variant == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def add_setting_arguments(parser, shape: str = "1b", batch: int = 4) -> None:
    """--out, --shape, --batch, --seq: the setting every training-step benchmark shares (its own defaults)."""
    parser.add_argument("--out", default=".")
    parser.add_argument("--shape", default=shape, choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq", type=int, default=2048)


def allocator_settings() -> str:
    """The caching allocator's settings from the environment (PYTORCH_ALLOC_CONF, or its older name), or "default"."""
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "default"


def _layer_graphs(model):
    """The LayerGraphs of the model's offloaded checkpoint (None when graphs or offloaded checkpointing are off)."""
    from fastlm.training.checkpointing import checkpointing_module
    from fastlm.training.offload import OffloadedCheckpoint
    _, checkpoint = checkpointing_module(model)
    return checkpoint.graphs if isinstance(checkpoint, OffloadedCheckpoint) else None


def step_lengths(steps: int, seq: int, lengths) -> list:
    """The sequence length of each of the 3 + `steps` steps: `seq` throughout, or with lengths=(lo, hi) one drawn
    uniformly from [lo, hi] per step (seeded: the same list for every implementation), as batches padded to their
    longest example have."""
    if lengths is None:
        return [seq] * (3 + steps)
    g = torch.Generator(device="cpu").manual_seed(1)
    return torch.randint(lengths[0], lengths[1] + 1, (3 + steps,), generator=g).tolist()


def right_padding(batch: int, length: int, pad_fraction: float, device) -> Optional[torch.Tensor]:
    """The attention mask (batch, length) of a right-padded batch: row r ends in round(pad_fraction * length * r /
    (batch - 1)) padded positions (row 0 none, the last row pad_fraction of its length), or None for no padding."""
    if not pad_fraction:
        return None
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    for row in range(1, batch):
        pad = round(pad_fraction * length * row / (batch - 1))
        if pad:
            mask[row, length - pad:] = 0
    return mask


def back_to_back_steps(one_step, length: int, steps: int, batch: int) -> dict:
    """The same training step run `steps` times in a row with one synchronization at the end, as a training loop
    runs it (the timed steps above synchronize before and after each, so each one's host work before its first
    kernel and after its last is GPU idle time): 3 steps first (pinned host buffers for a host running ahead), then
    the mean step time, tokens/s and the peak memory of the `steps` timed ones."""
    for _ in range(3):
        one_step(length)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step(length)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / steps
    return dict(back_to_back_ms=round(ms, 1), back_to_back_tokens_per_s=round(batch * length / (ms / 1000)),
                back_to_back_peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                back_to_back_peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                back_to_back_loss_last=round(loss.item(), 4))


def run_variant(variant, path, fast, batch, seq, steps, seed=0, cprofile_to=None, lengths=None,
                prompt_fraction=0.0, offloads=None, fp32=False, pad_fraction=0.0, back_to_back=0, host_timing=False):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    leftover = torch.cuda.memory_allocated()  # from the variant before (should be ~0)
    torch.manual_seed(seed)
    model = load(variant, path, fast, offloads=offloads, dtype=torch.float32 if fp32 else torch.bfloat16)
    model.train()
    load_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # the training peak is measured apart from loading's
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_step = step_lengths(steps, seq, lengths)
    ids = torch.randint(3, model.config.vocab_size, (batch, max(per_step)), generator=g).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    losses, times = [], []

    def one_step(length: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not fp32):
            step_ids = ids[:, :length]
            labels = step_ids.clone()
            labels[:, :int(prompt_fraction * labels.shape[1])] = -100  # a prompt the loss ignores
            mask = right_padding(batch, step_ids.shape[1], pad_fraction, step_ids.device)
            if mask is not None:  # padding: no labels there, as collators make it
                labels = labels.masked_fill(mask == 0, -100)
            loss = model(input_ids=step_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    profiler = cProfile.Profile() if cprofile_to else None
    timing = None
    if host_timing and fast:
        from bench.host_timing import HostTiming
        timing = HostTiming.install()
    warm_up_peaks = None
    for step in range(3 + steps):
        if step == 3:  # the warm-up steps' peaks (fastlm captures its CUDA graphs there), then the timed steps'
            warm_up_peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        if profiler is not None and step == 3:
            profiler.enable()  # the timed steps only: where the host's time goes
        if timing is not None and step == 3:
            timing.reset()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = one_step(per_step[step])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    if profiler is not None:
        profiler.disable()
        with open(cprofile_to, "w") as f:
            for key in ("tottime", "cumulative"):
                pstats.Stats(profiler, stream=f).sort_stats(key).print_stats(60)
    graphs = _layer_graphs(model) if fast else None
    ms = 1000 * sorted(times[3:])[len(times[3:]) // 2]
    if lengths is None:
        tokens_per_s = batch * seq / (ms / 1000)
        mfu = tokens_per_s * flops_per_token(model.config, seq) / (PEAK_BF16_TFLOPS * 1e12)
    else:  # every timed step's tokens over their whole time (capture steps included); MFU at the mean length
        tokens_per_s = batch * sum(per_step[3:]) / sum(times[3:])
        mean = sum(per_step[3:]) / len(per_step[3:])
        mfu = tokens_per_s * flops_per_token(model.config, round(mean)) / (PEAK_BF16_TFLOPS * 1e12)
    row = dict(variant=variant, impl="fastlm" if fast else "hf+peft", batch=batch, seq=seq, ms_per_step=round(ms, 1),
               tokens_per_s=round(tokens_per_s), mfu=round(mfu, 3),
               peak_alloc_gib=round(max(warm_up_peaks[0], torch.cuda.max_memory_allocated()) / 2**30, 2),
               load_peak_alloc_gib=round(load_peak / 2**30, 2), leftover_gib=round(leftover / 2**30, 2),
               peak_reserved_gib=round(max(warm_up_peaks[1], torch.cuda.max_memory_reserved()) / 2**30, 2),
               timed_peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               timed_peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), alloc_conf=allocator_settings())
    host_stats = torch.cuda.host_memory_stats()  # the pinned host memory cache (offloaded checkpointing's buffers)
    row.update(pinned_allocs=host_stats.get("num_host_alloc"), pinned_frees=host_stats.get("num_host_free"),
               pinned_alloc_ms=round(host_stats.get("host_alloc_time.total", 0) / 1000, 1),
               device_frees=torch.cuda.memory_stats().get("num_device_free"))
    if timing is not None:
        row.update(host_timing=timing.per_step(steps))
    if back_to_back:  # after the protocol's steps (their numbers above are unchanged by this)
        row.update(back_to_back_steps(one_step, per_step[-1], back_to_back, batch))
    if prompt_fraction:
        row.update(prompt_fraction=prompt_fraction)
    if pad_fraction:
        row.update(pad_fraction=pad_fraction)
    if lengths is not None:  # the lengths, and the time of the last half of the steps (most shapes seen by then)
        half = len(times) // 2
        row.update(lengths=f"{lengths[0]}-{lengths[1]}", seq=None, mean_length=round(mean),
                   last_half_tokens_per_s=round(batch * sum(per_step[half:]) / sum(times[half:])),
                   step_ms=[round(1000 * t, 1) for t in times], step_lengths=per_step)
    if fast:  # FASTLM_CUDA_GRAPHS, how many decoder-layer graphs the step replayed, their private pool's size
        pools = [segment["total_size"] for segment in torch.cuda.memory_snapshot()
                 if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)]
        from fastlm.kernels.cross_entropy import DEFAULT_CHUNK_BYTES
        from fastlm.kernels.lora_mlp import MLP_ROW_BLOCK_ELEMENTS
        from fastlm.training import length_buckets
        row.update(cuda_graphs=os.environ.get("FASTLM_CUDA_GRAPHS", "1"),
                   length_buckets=os.environ.get("FASTLM_LENGTH_BUCKETS", "auto"),
                   buckets_per_octave=length_buckets.BUCKETS_PER_OCTAVE,
                   mlp_block_elements=MLP_ROW_BLOCK_ELEMENTS, ce_chunk_mib=DEFAULT_CHUNK_BYTES // 2**20,
                   layer_graphs=graphs.captured() if graphs is not None else 0,
                   graph_pool_gib=round(sum(pools) / 2**30, 2))
    del model, optimizer, params
    gc.collect()
    torch.cuda.empty_cache()
    return row



def _patch(module_name: str, attribute: str, value) -> None:
    """Set module_name's `attribute` (dotted: "Class.name" sets it on that class) to value."""
    owner, *path = [importlib.import_module(module_name)] + attribute.split(".")
    for part in path[:-1]:
        owner = getattr(owner, part)
    setattr(owner, path[-1], value)


# --flag -> (what it brings back, the monkeypatch that does it): fastlm's earlier paths, for A/B runs in one call.
ABLATIONS = {
    "unfolded_gate_up": ("the MLP adds gate | up's LoRA terms with a second GEMM, as up to run 66, instead of folding "
                         "them into the base GEMM",
                         lambda: _patch("fastlm.kernels.lora_mlp", "_foldable", lambda bases, b_bd: False)),
    "unfolded_down": ("the MLP's backward adds down's LoRA term to dh with a second GEMM, as up to run 74, instead of "
                      "one GEMM of [dy | dy s B] [W; A]",
                      lambda: _patch("fastlm.kernels.lora_mlp", "_input_grad_foldable", lambda a_all: False)),
    "unfolded_qkv_dx": ("q/k/v's backward makes dx with three base GEMMs and a rank-R one, as up to run 76, instead "
                        "of one GEMM over [W_q; W_k; W_v; A] (lora_mlp keeps its own reference: down still folds)",
                        lambda: _patch("fastlm.kernels.lora", "_input_grad_foldable", lambda a_all: False)),
    "element_copy": ("16-bit weights are copied into the folded workspace element by element (torch's copy_), as "
                     "up to run 74, not as 8-byte words",
                     lambda: _patch("fastlm.kernels.lora", "_COPY_WORDS", ())),
    "recomputed_attention": ("the recomputation runs each layer's attention forward again, as up to run 80, instead "
                             "of taking the output and log-sum-exp its forward saved (offloaded with the layer input)",
                             lambda: _patch("fastlm.models.saved_attention", "ENABLED", False)),
    "padding_mask": ("a right-padded batch whose padding carries no labels keeps its attention mask, as up to "
                     "run 96, instead of running as a causal batch without it",
                     lambda: _patch("fastlm.models.causal_lm", "DROP_PADDING_MASK", False)),
    "h_recomputed": ("the MLP's blocked backward makes h for dA_down by the forward kernel again, as up to run 105, "
                     "instead of taking it from the activation's backward kernel (h_out, written over dh)",
                     lambda: _patch("fastlm.kernels.lora_mlp", "H_FROM_BACKWARD", False)),
    "copied_dx": ("each graphed layer's dx is copied out of the graphs' static buffer and back in by the next "
                  "layer, as up to run 76",
                  lambda: _patch("fastlm.training.layer_graphs", "LayerGraph.follows", lambda self, x: False)),
}


def add_ablation_arguments(parser) -> None:
    """One --flag per ABLATIONS entry."""
    for name, (help_text, _) in ABLATIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help="ablation (monkeypatch of this "
                            "process): " + help_text)


def apply_ablations(args) -> list:
    """Apply the ablations whose flags are set; their names."""
    chosen = [name for name in ABLATIONS if getattr(args, name)]
    for name in chosen:
        ABLATIONS[name][1]()
    return chosen


def main():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    parser.add_argument("--variants", default="qlora,lora16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--impls", default="hf,fastlm", help="run one per process to keep memory figures apart")
    parser.add_argument("--mlp-block-log2", type=int, default=None,
                        help="fastlm.kernels.lora_mlp.MLP_ROW_BLOCK_ELEMENTS = 2**N for this run (a sweep)")
    parser.add_argument("--ce-chunk-mib", type=int, default=None,
                        help="fastlm.kernels.cross_entropy.DEFAULT_CHUNK_BYTES in MiB for this run (a sweep)")
    parser.add_argument("--buckets-per-octave", type=int, default=None,
                        help="fastlm.training.length_buckets.BUCKETS_PER_OCTAVE for this run (a sweep)")
    parser.add_argument("--pad-fraction", type=float, default=0.0,
                        help="right-pad the batch (attention_mask, labels -100 there): row r of B ends in "
                             "pad_fraction * seq * r / (B - 1) padded positions")
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="labels -100 on the first F of every row (chat data's masked prompts)")
    parser.add_argument("--ce-rows", default="selected", choices=["selected", "sync", "all"],
                        help="ablation (monkeypatch of this process): the fused loss keeps labelled rows only, counted "
                             "ahead (selected, as shipped), counted at the loss (sync), or keeps every row (all)")
    parser.add_argument("--lengths", default=None,
                        help="LO-HI: each step's sequence length drawn from [LO, HI] (seeded), not --seq")
    parser.add_argument("--graph-capture", default="direct", choices=["direct", "torch"],
                        help="ablation (monkeypatch of this process): layer graphs captured as shipped (direct), or "
                             "through torch.cuda.graph, which synchronizes and empties the device and pinned host "
                             "caches before each capture (torch, as up to run 47)")
    parser.add_argument("--offload-embedding", action="store_true",
                        help="fastlm only: from_pretrained(offload_embedding=True), the input embedding in host memory")
    parser.add_argument("--offload-lm-head", action="store_true",
                        help="fastlm only: from_pretrained(offload_lm_head=True), the output layer streamed from host")
    parser.add_argument("--cprofile", action="store_true",
                        help="profile the timed steps' Python with cProfile (slower steps; the text goes to --out)")
    parser.add_argument("--fp32", action="store_true",
                        help="fastlm only: an fp32 model (dtype=torch.float32, 4-bit weights dequantized to fp32), no "
                             "autocast, TF32 off: the reference trajectory the bf16 runs' losses are compared with")
    parser.add_argument("--copies-in-flight", type=int, help="offloaded checkpointing's MAX_COPIES_IN_FLIGHT")
    parser.add_argument("--back-to-back", type=int, default=0, metavar="N",
                        help="after the timed steps, N more run in a row with one synchronization at the end "
                             "(back_to_back_steps): the step time without the per-step synchronization")
    parser.add_argument("--host-timing", action="store_true",
                        help="fastlm only: host time of the per-layer work in the timed steps (bench/host_timing.py)")
    add_ablation_arguments(parser)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = not args.fp32
    os.makedirs(args.out, exist_ok=True)  # --cprofile writes there before the JSON does
    import_fastlm_first(args.impls.split(","))
    if args.mlp_block_log2 is not None:
        from fastlm.kernels import lora_mlp
        lora_mlp.MLP_ROW_BLOCK_ELEMENTS = 2 ** args.mlp_block_log2
    if args.copies_in_flight is not None:
        from fastlm.training import offload
        offload.MAX_COPIES_IN_FLIGHT = args.copies_in_flight
    if args.buckets_per_octave is not None:
        from fastlm.training import length_buckets
        length_buckets.BUCKETS_PER_OCTAVE = args.buckets_per_octave
    if args.ce_chunk_mib is not None:
        from fastlm.kernels import cross_entropy
        cross_entropy.DEFAULT_CHUNK_BYTES = args.ce_chunk_mib * 2**20
    if args.ce_rows != "selected":
        from fastlm.kernels import cross_entropy
        from fastlm.models import causal_lm
        if args.ce_rows == "sync":
            causal_lm.LabelledCount = lambda *args, **kwargs: None
        else:
            cross_entropy._labelled_rows = lambda hidden, labels, *args: (hidden, labels)
    apply_ablations(args)
    if args.graph_capture == "torch":
        from fastlm.training import layer_graphs
        layer_graphs._capturing = lambda cuda_graph, pool, stream: torch.cuda.graph(
            cuda_graph, pool=pool, stream=stream, capture_error_mode="thread_local")
    lengths = tuple(int(n) for n in args.lengths.split("-")) if args.lengths else None
    path = make_checkpoint(args.shape)
    offloads = dict(offload_embedding=args.offload_embedding, offload_lm_head=args.offload_lm_head)
    rows = []
    for variant in args.variants.split(","):
        for fast in [impl == "fastlm" for impl in args.impls.split(",")]:
            try:
                impl = "fastlm" if fast else "hf"
                cprofile_to = os.path.join(args.out, f"cprofile_{args.shape}_{variant}_{impl}.txt")
                rows.append(run_variant(variant, path, fast, args.batch, args.seq, args.steps,
                                        cprofile_to=cprofile_to if args.cprofile else None, lengths=lengths,
                                        prompt_fraction=args.prompt_fraction, pad_fraction=args.pad_fraction,
                                        offloads=offloads if fast else None, fp32=args.fp32 and fast,
                                        back_to_back=args.back_to_back, host_timing=args.host_timing))
                if fast and args.ce_rows != "selected":
                    rows[-1].update(ce_rows=args.ce_rows)
                if fast:
                    rows[-1].update(graph_capture=args.graph_capture,
                                    ablations=[name for name in ABLATIONS if getattr(args, name)],
                                    fp32=args.fp32, **offloads)
            except Exception as exc:  # report and go on with the other variants
                rows.append(dict(variant=variant, impl="fastlm" if fast else "hf+peft", error=repr(exc)[:400]))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"train_step_{args.shape}_{args.impls.replace(',', '-')}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    for variant in args.variants.split(","):
        pair = {r["impl"]: r for r in rows if r["variant"] == variant and "error" not in r}
        if len(pair) == 2:
            hf, ours = pair["hf+peft"], pair["fastlm"]
            print(f"{variant}: fastlm {ours['tokens_per_s']} tok/s vs HF {hf['tokens_per_s']} "
                  f"({ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x), peak {ours['peak_alloc_gib']} vs "
                  f"{hf['peak_alloc_gib']} GiB ({ours['peak_alloc_gib'] / hf['peak_alloc_gib']:.2f}x), loss "
                  f"{ours['loss_last']} vs {hf['loss_last']}")


if __name__ == "__main__":
    main()
