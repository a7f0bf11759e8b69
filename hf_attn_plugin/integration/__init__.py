"""The only code that knows transformers: registration, kwargs -> one call, masks, caches."""

from .attention import AttentionCall, describe_call, plugin_attention
from .masks import plugin_mask
from .registration import ATTN_IMPLEMENTATION, is_registered, register

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionCall",
    "describe_call",
    "is_registered",
    "plugin_attention",
    "plugin_mask",
    "register",
]
