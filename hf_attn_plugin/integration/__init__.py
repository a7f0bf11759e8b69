"""The only code that knows transformers: registration, kwargs -> one call, masks, caches."""

from .attention import AttentionCall, describe_call, plugin_attention
from .continuous_batching import continuous_batching_context, generate_batch, init_continuous_batching
from .engine import EngineConfig, release_engine
from .masks import plugin_mask
from .paged_cache import PagedCache
from .registration import ATTN_IMPLEMENTATION, is_registered, register

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionCall",
    "EngineConfig",
    "PagedCache",
    "continuous_batching_context",
    "describe_call",
    "generate_batch",
    "init_continuous_batching",
    "is_registered",
    "plugin_attention",
    "plugin_mask",
    "register",
    "release_engine",
]
