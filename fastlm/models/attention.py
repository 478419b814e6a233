"""One attention forward for every supported family, driven by ModelSpec data.

It mirrors the attention modules of transformers 5.17-5.24 (LlamaAttention, MistralAttention, Qwen2/3Attention,
GemmaAttention, Gemma2/3Attention, Phi3Attention), which differ only in data:

    q, k, v = q_proj(x), k_proj(x), v_proj(x)              (B, T, nh*hd), (B, T, nkv*hd) x2
              (Phi-3: views of one qkv_proj(x); fused LoRA: the module's `fastlm_project_qkv(x)`)
    q, k    = q_norm(q), k_norm(k) per head                 (Qwen 3, Gemma 3: spec.qk_norm)
    q, k    = RoPE(q, k, cos, sin)                          fastlm.kernels.rope, cos/sin as the model passes them
    k, v    = cache.update(k, v, layer_idx)                 KV cache (generation)
    o       = attention_interface(q, k, v, mask, scaling, dropout, sliding_window?, softcap?)
              the function transformers itself picks from config._attn_implementation (eager / sdpa / flash...);
              under offloaded checkpointing plain causal SDPA keeps its output for the layer's recomputation
              instead (fastlm.models.saved_attention)
    return o_proj(o), attention weights

Everything else (which projections exist, the scaling from head_dim or query_pre_attn_scalar, per-layer
sliding windows) is read from the module instance and its config, as transformers' own forward does.
"""
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastlm.kernels.rope import apply_rope
from fastlm.models.saved_attention import saved_attention

# The attribute a fused-LoRA implementation sets on an attention module to take over the q/k/v projections:
# a callable hidden_states (B, T, H) -> (q, k, v), each (B, T, heads * head_dim) (q: attention heads, k and v:
# key/value heads). When present, the forward below calls it instead of q_proj/k_proj/v_proj (or qkv_proj).
PROJECT_QKV_ATTRIBUTE = "fastlm_project_qkv"


@dataclass(frozen=True)
class AttentionSettings:
    """What the attention forward needs beyond the module instance (built once per model from its ModelSpec).

    fused_qkv: the module holds one `qkv_proj` (Phi-3) instead of q_proj/k_proj/v_proj.
    qk_norm: per-head q_norm / k_norm modules run on q and k before RoPE.
    sliding_window: "layer", "config" or None (see ModelSpec.sliding_window).
    attn_softcap_key: config attribute passed as the attention function's `softcap` (Gemma 2), or None.
    eager: the family's own eager attention function (transformers' fallback for "eager").
    """
    fused_qkv: bool
    qk_norm: bool
    sliding_window: Optional[str]
    attn_softcap_key: Optional[str]
    eager: Callable


def settings_for(attention_module, spec) -> AttentionSettings:
    """AttentionSettings for one attention module of a family described by `spec`.

    Raises ValueError when the family's modeling file has no `eager_attention_forward` (a transformers version
    fastlm does not know), so the caller can leave attention unpatched.
    """
    eager = getattr(sys.modules.get(type(attention_module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(attention_module).__module__} has no eager_attention_forward")
    return AttentionSettings(fused_qkv="qkv_proj" in spec.fused_projections, qk_norm=spec.qk_norm,
                             sliding_window=spec.sliding_window, attn_softcap_key=spec.attn_softcap_key,
                             eager=eager)


def missing_parts(attention_module, settings: AttentionSettings) -> list:
    """Names of the submodules/attributes the forward needs that this module lacks (empty when it fits)."""
    needed = ["o_proj", "head_dim", "scaling", "layer_idx", "config", "attention_dropout"]
    needed += ["qkv_proj"] if settings.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    needed += ["q_norm", "k_norm"] if settings.qk_norm else []
    needed += ["sliding_window"] if settings.sliding_window == "layer" else []
    return [name for name in needed if not hasattr(attention_module, name)]


def _project_qkv(module, hidden_states: torch.Tensor, settings: AttentionSettings):
    """q (B, T, nh*hd), k and v (B, T, nkv*hd): from the fused-LoRA hook, Phi-3's qkv_proj, or three projections."""
    project = getattr(module, PROJECT_QKV_ATTRIBUTE, None)
    if project is not None:
        return project(hidden_states)
    if settings.fused_qkv:
        qkv = module.qkv_proj(hidden_states)
        q_width = module.config.num_attention_heads * module.head_dim
        kv_width = module.config.num_key_value_heads * module.head_dim
        return qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qkv[..., q_width + kv_width:]
    return module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *,
                      fastlm_settings: AttentionSettings, **kwargs):
    """Forward of one attention module (bound to the instance; `fastlm_settings` bound with functools.partial).

    Args:
        hidden_states: (B, T, H) in the model's compute dtype.
        position_embeddings: (cos, sin), each (B or 1, T, rotary_dim), from the model's rotary embedding.
        attention_mask: whatever transformers' mask creation made for this layer (4-D float/bool mask, None,
            or a block mask), handed to the attention function unchanged.
        kwargs: the cache under `cache` (transformers >= 5.2x) or `past_key_values` (5.17), and everything else
            transformers passes (position_ids, flash-attention varlen arguments...), forwarded to the cache
            update and to the attention function as transformers does.
    Returns:
        (output (B, T, H), attention weights or None), as transformers' attention modules return.
    """
    cache = kwargs.pop("cache", None)
    legacy_cache = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy_cache
    input_shape = hidden_states.shape[:-1]
    head_shape = (*input_shape, -1, self.head_dim)

    query, key, value = _project_qkv(self, hidden_states, fastlm_settings)
    query, key, value = query.reshape(head_shape), key.reshape(head_shape), value.reshape(head_shape)  # (B, T, n, hd)
    if fastlm_settings.qk_norm:  # per head, over hd: the same numbers before or after the transpose
        query, key = self.q_norm(query), self.k_norm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, n, T, hd)

    cos, sin = position_embeddings
    query, key = apply_rope(query, key, cos, sin)

    if cache is not None:  # transformers 5.24 passes kwargs=kwargs; 5.17's layers accept and ignore it
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                               fastlm_settings.eager)
    extra = {}
    if fastlm_settings.sliding_window == "layer":
        extra["sliding_window"] = self.sliding_window
    elif fastlm_settings.sliding_window == "config":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    if fastlm_settings.attn_softcap_key is not None:
        extra["softcap"] = getattr(self.config, fastlm_settings.attn_softcap_key)
    dropout = self.attention_dropout if self.training else 0.0
    weights = None
    output = saved_attention(self, query, key, value, attention_mask, dropout, self.scaling, cache,
                             {**extra, **kwargs})
    if output is None:  # not plain causal attention under offloaded checkpointing: transformers' function
        output, weights = attention_function(self, query, key, value, attention_mask, dropout=dropout,
                                             scaling=self.scaling, **extra, **kwargs)
    output = output.reshape(*input_shape, -1).contiguous()  # (B, T, nh*hd)
    return self.o_proj(output), weights
