"""Paged KV cache: page allocator, block tables, sequence bookkeeping (no Triton here).

See :mod:`hf_attn_plugin.paged.allocator` for the memory layout, and
:mod:`hf_attn_plugin.paged_ops` for the kernels' entry points (``write_kv``, ``paged_attention``).
"""

from .allocator import (
    BlockAllocator,
    OutOfPagesError,
    OutOfSequenceSlotsError,
    PagedCacheError,
    PagePool,
    SequenceTooLongError,
    StepPlan,
    UnknownSequenceError,
    bytes_per_page,
    num_pages_for_budget,
)

__all__ = [
    "BlockAllocator",
    "OutOfPagesError",
    "OutOfSequenceSlotsError",
    "PagedCacheError",
    "PagePool",
    "SequenceTooLongError",
    "StepPlan",
    "UnknownSequenceError",
    "bytes_per_page",
    "num_pages_for_budget",
]


def __getattr__(name: str):
    if name == "PagedKVCache":  # deprecated alias (the page pool's former name)
        import warnings

        warnings.warn("hf_attn_plugin.paged.PagedKVCache is now PagePool (PagedKVCache was too close to the "
                      "transformers Cache, hf_attn_plugin.PagedCache): use PagePool", DeprecationWarning, stacklevel=2)
        return PagePool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
