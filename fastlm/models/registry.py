"""Per-architecture facts, as data: `model_type` -> ModelSpec.

Everything that differs between the supported families and matters to fastlm lives here, so the code
that loads, patches and saves models stays one code path. A model whose `config.model_type` is not
here still loads through plain transformers (with a warning that no fast path exists).
"""
from dataclasses import dataclass, field
from typing import Optional

# The projections LoRA targets by default (Unsloth's default `target_modules`).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    """What fastlm needs to know about one architecture family.

    Attributes:
        model_type: `config.model_type` as transformers writes it.
        norm: "rms" (x * rstd * w, cast to the input dtype before the weight product),
            "rms_gemma" (x * rstd * (1 + w), all in fp32) or "layer" (LayerNorm).
        activation: the MLP gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh form).
        qk_norm: RMSNorm on q and k per head before RoPE (Qwen 3, Gemma 3).
        qkv_bias: biases on the q/k/v projections (Qwen 2).
        embedding_scale: embeddings are multiplied by sqrt(hidden_size) (Gemma family).
        attn_softcap_key / final_softcap_key: config attributes holding tanh soft-capping of attention
            scores / final logits (Gemma 2), or None.
        sliding_window: where the attention call's `sliding_window` argument comes from, as transformers
            writes it per family: "layer" (the attention module's own `sliding_window`, set from
            `config.layer_types`: Qwen 2/3, Gemma 2/3), "config" (`config.sliding_window` for every layer:
            Mistral, Phi-3) or None (not passed: Llama, Gemma).
        fused_projections: names of projections that hold several logical ones (Phi-3: qkv_proj holds q,k,v;
            gate_up_proj holds gate,up). LoRA targets these names instead of the split ones.
        extra_norms: norms beyond input/post-attention ones (Gemma 2/3 pre/post feed-forward norms).
        mlp_activation_attr: the MLP attribute holding the activation module ("act_fn"; Phi-3 "activation_fn").
        mlp_feeds_residual: the decoder layer adds the MLP's output straight to the residual stream (no norm on
            it, as Gemma 2/3's post_feedforward_layernorm), so backward never reads that output's value and a
            gradient-checkpointing recomputation may skip the down projection (fastlm.kernels.lora_mlp.lora_mlp).
    """
    model_type: str
    norm: str = "rms"
    activation: str = "silu"
    qk_norm: bool = False
    qkv_bias: bool = False
    embedding_scale: bool = False
    attn_softcap_key: Optional[str] = None
    final_softcap_key: Optional[str] = None
    sliding_window: Optional[str] = None
    fused_projections: dict = field(default_factory=dict)
    extra_norms: tuple = ()
    mlp_activation_attr: str = "act_fn"
    mlp_feeds_residual: bool = True

    def lora_targets(self, requested) -> list:
        """Map Unsloth-style target names onto this family's module names (Phi-3's fused projections)."""
        mapped = []
        for name in requested:
            for fused, parts in self.fused_projections.items():
                if name in parts:
                    name = fused
                    break
            if name not in mapped:
                mapped.append(name)
        return mapped


_GEMMA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")

SUPPORTED = {
    spec.model_type: spec
    for spec in (
        ModelSpec("llama"),
        ModelSpec("mistral", sliding_window="config"),
        ModelSpec("qwen2", qkv_bias=True, sliding_window="layer"),
        ModelSpec("qwen3", qk_norm=True, sliding_window="layer"),
        ModelSpec("gemma", norm="rms_gemma", activation="gelu_tanh", embedding_scale=True),
        ModelSpec("gemma2", norm="rms_gemma", activation="gelu_tanh", embedding_scale=True,
                  attn_softcap_key="attn_logit_softcapping", final_softcap_key="final_logit_softcapping",
                  sliding_window="layer", extra_norms=_GEMMA_NORMS, mlp_feeds_residual=False),
        # Gemma 3 keeps attn_logit_softcapping in its config but does not pass it to attention.
        ModelSpec("gemma3_text", norm="rms_gemma", activation="gelu_tanh", embedding_scale=True, qk_norm=True,
                  final_softcap_key="final_logit_softcapping", sliding_window="layer", extra_norms=_GEMMA_NORMS,
                  mlp_feeds_residual=False),
        ModelSpec("phi3", sliding_window="config", mlp_activation_attr="activation_fn",
                  fused_projections={"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                     "gate_up_proj": ("gate_proj", "up_proj")}),
    )
}


def spec_for(model_type: str) -> Optional[ModelSpec]:
    """The ModelSpec of a supported family, or None when fastlm has no fast path for it."""
    return SUPPORTED.get(model_type)
