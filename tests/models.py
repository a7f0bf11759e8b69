"""Tiny random configs of every model family the plugin supports (no downloads)."""

from __future__ import annotations

import copy

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)


def _gemma2():
    return transformers.Gemma2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=4,
        attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
    )


def _gemma3():
    return transformers.Gemma3TextConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
    )


def _gpt_oss():
    return transformers.GptOssConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
    )


DECODERS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, layer_types=["full_attention", "sliding_attention"],
    ),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": lambda: transformers.Phi3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gpt_oss": _gpt_oss,
}


def deepseek_v3():
    """Multi-head latent attention (MLA) with a value head dim of its own: q/k head dim 16 + 8 = 24, v head dim 16;
    one dense layer and one mixture-of-experts layer. Not in :data:`DECODERS`: its cache holds the compressed
    latents, not per-head K/V (the paged cache and the KV-head conversion do not apply)."""
    return transformers.DeepseekV3Config(
        **COMMON, moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    )


def make_pair(config, auto_class=transformers.AutoModelForCausalLM, impl="plugin"):
    """The same random weights under ``impl`` and ``eager`` (separate config objects: from_config mutates them)."""
    torch.manual_seed(0)
    ours = auto_class.from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    eager = auto_class.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(ours.state_dict())
    # GPT-OSS initialises its sinks to zero; random ones exercise the sink path.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("sinks"):
                p.normal_()
                dict(eager.named_parameters())[name].copy_(p)
    assert ours.config._attn_implementation == impl and eager.config._attn_implementation == "eager"
    return ours, eager
