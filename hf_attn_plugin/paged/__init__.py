"""Paged KV cache: page allocator, block tables, sequence bookkeeping (no Triton here).

See :mod:`hf_attn_plugin.paged.allocator` for the memory layout, and
:mod:`hf_attn_plugin.paged_ops` for the kernels' entry points (``write_kv``, ``paged_attention``).
"""

from .allocator import (
    BlockAllocator,
    OutOfPagesError,
    OutOfSequenceSlotsError,
    PagedCacheError,
    PagedKVCache,
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
    "PagedKVCache",
    "SequenceTooLongError",
    "StepPlan",
    "UnknownSequenceError",
    "bytes_per_page",
    "num_pages_for_budget",
]
