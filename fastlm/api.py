"""FastLanguageModel: Unsloth's entry point, argument for argument. Thin: it validates and delegates."""
import functools
import inspect
import logging
from typing import List, Optional, Tuple, Union

import torch

from fastlm.export import attach_save_methods
from fastlm.loading.load import load_model_and_tokenizer
from fastlm.models.registry import DEFAULT_TARGET_MODULES
from fastlm.state import base_model_of, state_of
from fastlm.training.checkpointing import set_gradient_checkpointing
from fastlm.training.lora import add_lora

logger = logging.getLogger("fastlm")

# Arguments whose feature is not built yet: any value but the default raises NotImplementedError.
_NOT_YET = {"fast_inference": False, "load_in_fp8": False, "qat_scheme": None, "float8_kv_cache": False}
# vLLM engine settings: they matter only with fast_inference=True.
_VLLM_ONLY = {"gpu_memory_utilization": 0.5, "max_lora_rank": 64, "disable_log_stats": True}


def _with_explicit_arguments(method):
    """Pass the set of argument names the caller wrote out as `_explicit` (to tell a default from a choice)."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        explicit = frozenset(signature.bind_partial(*args, **kwargs).arguments)
        return method(*args, _explicit=explicit, **kwargs)
    wrapper.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "_explicit"])
    return wrapper


class FastLanguageModel:
    """Load causal LMs for fast, light fine-tuning, and add LoRA adapters. See the README for a tour."""

    @staticmethod
    @_with_explicit_arguments
    def from_pretrained(
        model_name: str = "unsloth/Llama-3.2-1B-Instruct",
        max_seq_length: int = 2048,
        dtype: Optional[torch.dtype] = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: Optional[str] = None,
        device_map: str = "sequential",
        rope_scaling: Optional[dict] = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: str = "unsloth",
        resize_model_vocab: Optional[int] = None,
        revision: Optional[str] = None,
        use_exact_model_name: bool = False,
        offload_embedding: bool = False,
        float32_mixed_precision: Optional[bool] = None,
        fast_inference: bool = False,
        gpu_memory_utilization: float = 0.5,
        float8_kv_cache: bool = False,
        random_state: int = 3407,
        max_lora_rank: int = 64,
        disable_log_stats: bool = True,
        qat_scheme: Optional[str] = None,
        load_in_fp8: Union[bool, str] = False,
        unsloth_tiled_mlp: bool = False,
        *args,
        offload_lm_head: bool = False,
        _explicit: frozenset = frozenset(),
        **kwargs,
    ) -> Tuple["PreTrainedModel", "PreTrainedTokenizer"]:
        """Load a model and its tokenizer for fine-tuning.

        Args:
            model_name: a local checkpoint directory, a PEFT adapter directory (its base model is loaded, the
                adapter attached trainable), a .gguf file or a directory holding one, or a hub id.
            max_seq_length: the longest sequence to train on; stored as `model.max_seq_length` and the tokenizer's
                `model_max_length`. Beyond the model's `max_position_embeddings`, RoPE is stretched (linear
                unless `rope_scaling` says otherwise), with a warning.
            dtype: compute dtype: torch.bfloat16 / torch.float16 / torch.float32 or their names; None picks bf16 on
                GPUs that support it, fp16 on older GPUs, fp32 on the CPU.
            load_in_4bit: NF4 with double quantization (QLoRA). The default; any other mode flag you set wins
                over it, and writing `load_in_4bit=True` together with another mode raises ValueError.
            load_in_8bit: LLM.int8 weights. load_in_16bit: unquantized weights in `dtype`.
            full_finetuning: every parameter trains; no quantization; get_peft_model returns the model unchanged.
            token: hub access token (never printed or logged). revision: hub branch, tag or commit.
            device_map: "sequential" (default; one GPU, or this rank's GPU under torch.distributed), "auto",
                "cpu" or a dict, as in transformers. Without a GPU the model goes to the CPU.
            rope_scaling: RoPE parameters, e.g. {"rope_type": "yarn", "factor": 4.0}.
            fix_tokenizer: give the tokenizer a pad token distinct from eos, and right padding.
            trust_remote_code: run modeling code shipped with the checkpoint.
            use_gradient_checkpointing: True, False or "unsloth": for full fine-tuning applied now, otherwise the
                default for get_peft_model.
            resize_model_vocab: resize the embedding matrices to this many rows.
            use_exact_model_name: accepted for compatibility; fastlm never renames models.
            float32_mixed_precision: keep trained parameters in fp32 (see fastlm.loading.precision).
            random_state: seeds Python, NumPy and torch.
            fast_inference, gpu_memory_utilization, float8_kv_cache, max_lora_rank, disable_log_stats: vLLM
                generation, not built yet: fast_inference=True raises NotImplementedError.
            unsloth_tiled_mlp: the LoRA MLPs added by get_peft_model run by blocks of rows and make gate / up
                again in backward instead of keeping them (less activation memory for long sequences, two of the
                MLP's three GEMMs again; under "unsloth" checkpointing Llama-like MLPs already run this way).
                Needs fastlm's fast path (on CUDA; FASTLM_FAST_PATH=1 elsewhere) and LoRA (not full fine-tuning).
            offload_embedding: keep the input embedding in pinned host memory, where the GPU reads the batch's
                rows in place (fastlm.loading.host_weights): its whole size less GPU memory (0.98 GiB for
                Llama-3.1-8B, whose lookup of 2 x 2048 tokens then takes 0.7 ms instead of 0.03). Not for models
                whose output layer shares the input embedding (tie_word_embeddings) unless offload_lm_head=True
                streams that layer, or for full fine-tuning (ValueError). On the CPU there is nothing to move.
            offload_lm_head: (fastlm's own, keyword-only) keep the output layer in pinned host memory, streamed to
                the GPU by blocks once per loss or logits computation (fastlm.kernels.streamed_cross_entropy): its
                whole size less GPU memory (0.98 GiB for Llama-3.1-8B) for ~6 ms more per training step (the loss
                waits on the PCIe copies: 20 ms against 14) and ~20 ms more per generated token. Only for a
                bias-free, frozen lm_head without logit softcapping (ValueError otherwise: a bias, full
                fine-tuning, Gemma 2's softcap); with tied embeddings the one matrix moves (the input embedding's
                lookups then read it in host memory, as offload_embedding does). On the CPU there is nothing to move.
            qat_scheme, load_in_fp8: not built yet; a non-default value raises NotImplementedError.
            **kwargs: passed to transformers' AutoModelForCausalLM.from_pretrained (e.g. attn_implementation).

        Returns:
            (model, tokenizer): a transformers PreTrainedModel (a PeftModel when model_name is an adapter), with
            Unsloth's `model.save_pretrained_merged(dir, tokenizer, save_method=...)` and
            `model.save_pretrained_gguf(dir, tokenizer, quantization_method=...)` (fastlm.export).

        Raises:
            FileNotFoundError: missing path, directory with no config.json / adapter / .gguf, missing weights.
            OSError: damaged config or weight file; hub id not available (offline and not cached, unknown,
                private without token).
            ValueError: conflicting precision flags, unsupported dtype, a model that is not a causal LM, bad values.
            NotImplementedError: an argument whose feature is not built yet was given a non-default value.
        """
        if args:
            raise TypeError(f"from_pretrained got {len(args)} unexpected positional argument(s); pass options by name.")
        given = locals()
        for name, default in _NOT_YET.items():
            if given[name] != default:
                raise NotImplementedError(f"{name}={given[name]!r} is not supported by fastlm yet; leave {name} at "
                                          f"its default ({default!r}).")
        for name, default in _VLLM_ONLY.items():
            if given[name] != default:
                logger.warning("fastlm: %s only applies to vLLM generation (fast_inference=True); it has no effect "
                               "here.", name)
        for name in ("use_exact_model_name", "unsloth_tiled_mlp", "offload_embedding", "offload_lm_head"):
            if not isinstance(given[name], bool):
                raise TypeError(f"{name} must be True or False, got {given[name]!r}.")
        model, tokenizer = load_model_and_tokenizer(
            model_name, max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit, load_in_16bit=load_in_16bit, full_finetuning=full_finetuning, token=token,
            device_map=device_map, rope_scaling=rope_scaling, fix_tokenizer=fix_tokenizer,
            trust_remote_code=trust_remote_code, use_gradient_checkpointing=use_gradient_checkpointing,
            resize_model_vocab=resize_model_vocab, revision=revision,
            float32_mixed_precision=float32_mixed_precision, random_state=random_state,
            tiled_mlp=unsloth_tiled_mlp, offload_embedding=offload_embedding, offload_lm_head=offload_lm_head,
            explicit=_explicit, model_kwargs=kwargs)
        attach_save_methods(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules: Union[List[str], str] = list(DEFAULT_TARGET_MODULES),
        lora_alpha: int = 16,
        lora_dropout: float = 0,
        bias: str = "none",
        use_gradient_checkpointing: str = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        loftq_config: Optional[dict] = None,
        modules_to_save: Optional[List[str]] = None,
        **kwargs,
    ):
        """Add LoRA adapters (a peft.PeftModel) to a model from from_pretrained.

        Args:
            r: LoRA rank (> 0). lora_alpha: scaling numerator (> 0); the update is scaled by alpha / r (alpha / sqrt(r)
                with use_rslora). lora_dropout: in [0, 1). bias: "none", "all" or "lora_only".
            target_modules: module names, or "all-linear". "embed_tokens" / "lm_head" are trained fully (fp32 on a
                16-bit model; tied embeddings stay tied). Phi-3's fused projections are matched by the split names.
            use_gradient_checkpointing: True, False or "unsloth". random_state: seeds the adapter initialisation.
            loftq_config: peft LoftQConfig (or its dict) to initialise from the 16-bit weights.
            modules_to_save: other modules to train fully.
            **kwargs: other peft.LoraConfig fields (layers_to_transform, init_lora_weights, use_dora, ...).

        Returns:
            A peft.PeftModel; the model itself, unchanged, when it was loaded with full_finetuning=True or already
            has the same adapter. Either has `save_pretrained_merged` and `save_pretrained_gguf` (fastlm.export).

        Raises:
            ValueError / TypeError: bad values, unknown target modules (the message lists the model's), or an
            existing adapter with other settings.
        """
        model = add_lora(model, r=r, target_modules=target_modules, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         bias=bias, use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                         use_rslora=use_rslora, loftq_config=loftq_config, modules_to_save=modules_to_save,
                         kwargs=dict(kwargs))
        attach_save_methods(model)
        return model

    @staticmethod
    def for_inference(model):
        """Switch to generation: eval mode, KV cache on, checkpointing off, tokenizer padding on the left."""
        base = base_model_of(model)
        model.eval()
        set_gradient_checkpointing(base, False)
        base.config.use_cache = True
        state = state_of(model)
        if state is not None and state.tokenizer is not None:
            state.tokenizer.padding_side = "left"
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing: Union[bool, str, None] = None):
        """Switch back to training: train mode, checkpointing as loaded (or as given), right padding."""
        base = base_model_of(model)
        state = state_of(model)
        if use_gradient_checkpointing is None:
            use_gradient_checkpointing = state.use_gradient_checkpointing if state is not None else True
        model.train()
        set_gradient_checkpointing(base, use_gradient_checkpointing)
        if state is not None and state.tokenizer is not None:
            state.tokenizer.padding_side = "right"
        return model
