"""Registering ``"plugin"`` with transformers (idempotent)."""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import plugin_attention
from .masks import plugin_mask

ATTN_IMPLEMENTATION = "plugin"


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention function and its mask function under ``name`` and return the name.

    Both registrations are needed: without a mask function transformers hands the attention function
    ``attention_mask=None`` even for padded batches. Call it before a model is built; importing
    :mod:`hf_attn_plugin` already does so for ``"plugin"``.
    """
    if "flash" in name or "sdpa" in name or "/" in name:
        raise ValueError(f"{name!r}: names containing 'flash', 'sdpa' or '/' get special handling in transformers")
    AttentionInterface.register(name, plugin_attention)
    AttentionMaskInterface.register(name, plugin_mask)
    return name


def is_registered(name: str = ATTN_IMPLEMENTATION) -> bool:
    """Whether ``name`` runs our attention function and our mask function (transformers' public mappings)."""
    return (ALL_ATTENTION_FUNCTIONS.get(name) is plugin_attention
            and ALL_MASK_ATTENTION_FUNCTIONS.get(name) is plugin_mask)
