"""Every difference between the transformers releases we support (5.17 through the latest 5.x) lives here, and so
does every use of a transformers attribute that is not public API (each behind a named function saying why).

Other modules of :mod:`hf_attn_plugin.integration` never compare versions and never read a private attribute of
transformers; they use the public interfaces (``AttentionInterface`` / ``AttentionMaskInterface`` ``register``,
``ALL_ATTENTION_FUNCTIONS``, ``ALL_MASK_ATTENTION_FUNCTIONS``) or the functions below.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface

TRANSFORMERS_VERSION = Version(transformers.__version__)


def is_compiling() -> bool:
    """True while dynamo traces: no host synchronisation, no Python-side memoisation."""
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------- kwarg names
def max_length_kwarg(kwargs: dict, which: str) -> int | None:
    """Maximum packed-sequence length (``which``: ``"q"`` or ``"k"``), under the names transformers releases have
    used: ``max_length_q/k`` (5.19+), ``max_seqlen_q/k`` (5.17-5.18)."""
    for name in (f"max_length_{which}", f"max_seqlen_{which}"):
        value = kwargs.get(name)
        if value is not None:
            return int(value)
    return None


def batch_lengths(kwargs: dict, layer_type: str) -> tuple[torch.Tensor, int, int]:
    """``(cu_seq_lens_k, max_q, max_k)`` of a continuous-batching step for the layers of ``layer_type``.

    Where a model mixes layer types, transformers passes ``cu_seq_lens_k`` and the key length as a dict per layer
    type (``"full_attention"``, ...); the lengths are ``max_length_q/k`` on 5.19+, ``max_seqlen_q/k`` on 5.17-5.18.
    """
    names = ("max_length_q", "max_length_k") if "max_length_q" in kwargs else ("max_seqlen_q", "max_seqlen_k")
    cu_k, max_q, max_k = kwargs["cu_seq_lens_k"], kwargs[names[0]], kwargs[names[1]]
    if isinstance(cu_k, dict):
        cu_k = cu_k[layer_type]
    if isinstance(max_k, dict):
        max_k = max_k[layer_type]
    return cu_k, int(max_q), int(max_k)


# --------------------------------------------------------------------------- continuous batching regimes
# How transformers' continuous batching reaches a non-flash attention function:
# * 5.19+: the model calls its PagedAttentionCache's ``update`` itself and hands the attention function what
#   ``update`` returns (with ``cu_seq_lens_k`` / ``max_length_k`` per layer type and the step's indices);
#   only "paged|eager", "sdpa" and flash names are accepted unless the manager is told otherwise.
# * 5.17-5.18: transformers switches a model to "paged|<name>" and calls that attention function with the new K/V
#   and ``cache=`` (the PagedAttentionCache), ``max_seqlen_q/k``.
CACHE_UPDATE_REGIME = TRANSFORMERS_VERSION.release >= (5, 19)


def paged_attention_name(name: str) -> str:
    """The name transformers 5.17-5.18 switch a model's ``name`` attention to under continuous batching."""
    return "paged|" + name


def register_paged_attention(name: str, attention) -> bool:
    """Register ``attention`` under :func:`paged_attention_name` where transformers calls that name (5.17-5.18);
    on 5.19+ nothing is registered (no built-in name is overridden). Returns whether it registered."""
    if CACHE_UPDATE_REGIME:
        return False
    AttentionInterface.register(paged_attention_name(name), attention)
    return True


def attn_implementation(model) -> str:
    """The attention implementation a model runs. Private attribute: ``config._attn_implementation`` is the only
    accessor on 5.17-5.24 (``set_attn_implementation`` is the public setter)."""
    return model.config._attn_implementation


def cached_manager(model):
    """The continuous-batching manager transformers keeps on ``model`` (``None`` if none). Private attribute:
    ``_cached_continuous_batching_manager`` (5.17-5.24) is where ``init_continuous_batching`` caches it."""
    return getattr(model, "_cached_continuous_batching_manager", None)


@functools.cache
def manager_class(attn_name: str, in_place_update):
    """transformers' ``ContinuousBatchingManager`` for ``attn_name`` models, on both regimes.

    * 5.19+: it accepts ``attn_name`` itself and replaces the ``update`` of its own ``PagedAttentionCache`` with
      ``in_place_update(cache)`` (the model then hands our attention function what that returns).
    * 5.17-5.18: it switches the model to :func:`paged_attention_name` itself (the base class would switch to
      flash attention when flash-attn is installed); transformers restores the original name on ``stop``.
    * every version: it honours an explicit ``max_blocks_per_request > 0`` (transformers keeps its block-table
      decode path for flash attention only and zeroes it for other names).

    Private hooks it overrides or sets, 5.17-5.24: ``_create_batch_processor`` (the one point where the manager's
    cache exists before the first step) and ``_original_attn_impl`` (what ``stop`` restores).
    """
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    paged_name = paged_attention_name(attn_name)

    class PluginContinuousBatchingManager(ContinuousBatchingManager):
        def __init__(self, model, generation_config, continuous_batching_config, workload_hints=None):
            requested = continuous_batching_config.max_blocks_per_request
            super().__init__(model, generation_config, continuous_batching_config, workload_hints)
            if requested:  # transformers resolves a copy of the config and zeroes this for non-flash attention
                self.continuous_batching_config.max_blocks_per_request = requested

        def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
            impl = attn_implementation(model)
            if impl not in (attn_name, paged_name):
                raise ValueError(
                    f"hf_attn_plugin continuous batching runs models loaded with attn_implementation={attn_name!r}; "
                    f"this one uses {impl!r} (call model.generate_batch directly for it)"
                )
            if not CACHE_UPDATE_REGIME and impl == attn_name:
                model.set_attn_implementation(paged_name)
                self._original_attn_impl = impl

        def _create_batch_processor(self):
            processor = super()._create_batch_processor()
            if CACHE_UPDATE_REGIME and not isinstance(processor.cache.update, in_place_update):
                processor.cache.update = in_place_update(processor.cache)
            return processor

    return PluginContinuousBatchingManager


def logits_processors(model, generation_config) -> list:
    """The logits processors ``generation_config`` implies for ``model`` (our engine runs only calls without any).
    Private method ``_get_logits_processor``, called with the config alone as transformers' continuous batching
    calls it (5.17 and 5.24)."""
    return list(model._get_logits_processor(generation_config))


# --------------------------------------------------------------------------- continuous batching: the paged cache
def continuous_batching_config(page_size: int | None = None, **fields):
    """``transformers.ContinuousBatchingConfig(**fields)`` with ``page_size`` tokens per KV page: the field is named
    ``page_size`` on 5.24 and ``block_size`` on 5.17 (found by field name, not by release)."""
    from transformers import ContinuousBatchingConfig

    if page_size is not None:
        names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        fields["page_size" if "page_size" in names else "block_size"] = page_size
    return ContinuousBatchingConfig(**fields)


def kv_in_use(cache) -> tuple[int, int]:
    """``(blocks, bytes)`` of KV cache that the requests of a transformers ``PagedAttentionCache`` reference now, over
    every layer group (a block: one page of ``page_size`` tokens for each layer of its group); a block shared by
    several requests (prefix sharing) counts once, blocks kept only for later prefix matches (finished requests'
    hashed blocks) not at all. Private attributes: the per-request ``block_table`` dicts of
    ``cache.cache_allocators`` (5.24; ``bytes_per_block`` each) or ``cache.group_cache_managers`` (5.17: every
    group's blocks span ``len(cache.key_cache)`` layers)."""
    def distinct(group) -> int:
        return len(set(itertools.chain.from_iterable(group.block_table.values())))

    allocators = getattr(cache, "cache_allocators", None)
    if allocators is not None:
        counts = [(distinct(a), a.bytes_per_block) for a in allocators.values()]
    else:
        k = cache.key_cache[0]
        block_bytes = 2 * len(cache.key_cache) * cache.block_size * k[0].numel() * k.element_size()
        counts = [(distinct(g), block_bytes) for g in cache.group_cache_managers]
    return sum(n for n, _ in counts), sum(n * size for n, size in counts)


def window_page_views(allocator, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A sliding-window layer's K and V page views ``[pages, page_size, H_kv, D]`` in transformers' cache, or
    ``None`` where this release does not keep them (the caller then reads the window through transformers). The
    sliding allocator shares the full-attention allocator's layout but refuses its public
    ``get_cache_for_block_table``. Private attribute: ``_kv_page_views`` (5.24)."""
    views = getattr(allocator, "_kv_page_views", None)
    return None if views is None else views.get(layer_idx)
