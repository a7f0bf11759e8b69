"""Page allocator and per-sequence block tables for the paged KV cache (no Triton here).

Memory layout
-------------
One K pool and one V pool per layer, preallocated once::

    k_pools[layer], v_pools[layer]: [num_pages, page_size, num_kv_heads, head_dim]

Token ``p`` (0-based position) of a sequence lives in page ``pages[p // page_size]`` at offset
``p % page_size``. Its *slot* is ``page * page_size + offset``: the row of
``pool.view(num_pages * page_size, num_kv_heads, head_dim)`` that holds it. The kernels take

* ``block_tables``: int32 ``[num_seqs, max_pages_per_seq]``, row ``i`` lists sequence ``i``'s pages
  in order (entries past the sequence's last page are padding, never read);
* ``seq_lens``: int32 ``[num_seqs]``, tokens in the cache per sequence (new tokens included);
* ``slot_mapping``: int64 ``[num_new_tokens]``, where each new token is written (``-1``: skip).

Pages are reference counted. :meth:`PagePool.fork` shares every page of a sequence (parallel
sampling, beams, shared prompt prefixes); a write into a shared, partially filled last page first
copies it (copy-on-write), so no sequence ever writes into a page another sequence reads. Full pages
are never written again, so they stay shared until freed.

Typical step (what an integration layer does)::

    pool = PagePool(num_layers, num_kv_heads, head_dim, memory_gib=20, max_seqs=256,
                    max_seq_len=8192, dtype=torch.bfloat16, device="cuda")
    sid = pool.add_sequence()
    step = pool.plan([sid, ...], [prompt_len, ...])       # allocates pages, builds the tensors
    for layer in range(num_layers):
        write_kv(pool.k_pools[layer], pool.v_pools[layer], k, v, step.slot_mapping)
        out = paged_attention(q, pool.k_pools[layer], pool.v_pools[layer], step.block_tables,
                              step.seq_lens, cu_seqlens_q=step.cu_seqlens_q,
                              max_seqlen_q=step.max_seqlen_q)
    pool.free(sid)                                         # when the request finishes

(Integration code that runs many layers per step builds the kernels' launch plan once per step,
:func:`hf_attn_plugin.paged_ops.plan`, and calls :func:`hf_attn_plugin.paged_ops.run` per layer.)

All bookkeeping is in Python on the host and deterministic: pages come from a LIFO free list (the
lowest page numbers first on a fresh cache); every operation costs O(pages touched).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from .._checks import mark_built

__all__ = [
    "PagedCacheError",
    "OutOfPagesError",
    "OutOfSequenceSlotsError",
    "SequenceTooLongError",
    "UnknownSequenceError",
    "BlockAllocator",
    "PagePool",
    "StepPlan",
    "bytes_per_page",
    "num_pages_for_budget",
]


class PagedCacheError(RuntimeError):
    """Base class of the paged cache's errors."""


class OutOfPagesError(PagedCacheError):
    """Not enough free pages. Nothing was allocated or modified: the caller may preempt a sequence
    (``free`` it, or keep it and retry later) and call again."""

    def __init__(self, needed: int, available: int):
        super().__init__(f"out of KV cache pages: need {needed}, {available} free")
        self.needed = needed
        self.available = available


class OutOfSequenceSlotsError(PagedCacheError):
    """All ``max_seqs`` rows of the block table are in use."""


class SequenceTooLongError(PagedCacheError):
    """A sequence would need more than ``max_pages_per_seq`` pages."""


class UnknownSequenceError(PagedCacheError, KeyError):
    """A sequence id that is not live: freed already, or never handed out. Ids are never reused, so a
    stale id can never reach a newer sequence."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _count(name: str, value, minimum: int = 0) -> int:
    """An integer argument >= ``minimum`` (bools, floats and strings refused: no silent truncation)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def bytes_per_page(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page costs across all layers, K and V."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("page_size", page_size)):
        _count(name, value, 1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize


def num_pages_for_budget(
    memory_gib: float, *, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """How many pages fit in ``memory_gib`` GiB (K and V pools of every layer together)."""
    per_page = bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)
    if isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) or not math.isfinite(memory_gib) \
            or memory_gib <= 0:
        raise ValueError(f"memory_gib must be a finite number of GiB > 0, got {memory_gib!r}")
    return int(memory_gib * 2**30) // per_page


class BlockAllocator:
    """Reference-counted pages ``0 .. num_pages-1`` with a LIFO free list."""

    def __init__(self, num_pages: int):
        num_pages = _count("num_pages", num_pages, 1)
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._refcount = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _page(self, page) -> int:
        p = _count("page", page, minimum=-(2**63))
        if not 0 <= p < self.num_pages:
            raise ValueError(f"page {p} does not exist (pages are 0 .. {self.num_pages - 1})")
        return p

    def refcount(self, page: int) -> int:
        return self._refcount[self._page(page)]

    def allocate(self, n: int = 1) -> list[int]:
        """``n`` fresh pages with refcount 1; raises :class:`OutOfPagesError` (allocating none)."""
        n = _count("n", n)
        if n > len(self._free):
            raise OutOfPagesError(n, len(self._free))
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: Sequence[int]) -> None:
        """One more reference to each page (all allocated; all-or-nothing)."""
        pages = [self._page(p) for p in pages]
        for p in pages:
            if self._refcount[p] <= 0:
                raise PagedCacheError(f"page {p} is not allocated")
        for p in pages:
            self._refcount[p] += 1

    def decref(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page (all-or-nothing); pages reaching zero go back to the free list."""
        pages = [self._page(p) for p in pages]
        for p, n in Counter(pages).items():
            if self._refcount[p] < n:
                raise PagedCacheError(f"page {p} freed more often than it was referenced ({n} > "
                                      f"{self._refcount[p]} references)")
        for p in pages:
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)


@dataclass
class StepPlan:
    """Tensors for one forward step over ``seq_ids`` (all on the cache's device).

    ``slot_mapping`` int64 [T]: where each new token goes (tokens ordered sequence by sequence);
    ``block_tables`` int32 [N, max_pages_per_seq]; ``seq_lens`` int32 [N] (after the new tokens);
    ``cu_seqlens_q`` int32 [N+1]: new tokens of sequence ``i`` are rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q; ``max_seqlen_q``: the largest count of new tokens.
    """

    seq_ids: list[int]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int

    @property
    def is_decode(self) -> bool:
        """One new token per sequence: ``cu_seqlens_q`` may be dropped (the decode kernel path)."""
        return self.max_seqlen_q == 1 and self.slot_mapping.numel() == len(self.seq_ids)


class PagePool:
    """The page pool: K/V pools of every layer, the page allocator, and per-sequence block tables.

    (Formerly ``PagedKVCache``, a name too close to the transformers ``Cache`` built on it,
    :class:`hf_attn_plugin.PagedCache`; ``hf_attn_plugin.paged.PagedKVCache`` still works, with a
    ``DeprecationWarning``.)

    Size the pools with ``num_pages`` or ``memory_gib`` (one of them). ``max_seqs`` rows of the block
    table exist, so at most ``max_seqs`` sequences live at once. ``max_seq_len`` (or
    ``max_pages_per_seq``) bounds one sequence and sets the block table's width.

    Sequence ids are handed out in increasing order and never reused: an id that was freed stays dead
    (every method raises :class:`UnknownSequenceError` for it), even when its block-table row serves a
    newer sequence (:meth:`row`).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_pages: int | None = None,
        memory_gib: float | None = None,
        page_size: int = 16,
        max_seqs: int = 256,
        max_seq_len: int | None = None,
        max_pages_per_seq: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ):
        if (num_pages is None) == (memory_gib is None):
            raise ValueError("give exactly one of num_pages or memory_gib")
        num_layers, num_kv_heads, head_dim = (_count(n, v, 1) for n, v in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        page_size, max_seqs = _count("page_size", page_size, 1), _count("max_seqs", max_seqs, 1)
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if num_pages is None:
            num_pages = num_pages_for_budget(
                memory_gib, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                page_size=page_size, dtype=dtype,
            )
            if num_pages == 0:
                raise ValueError(f"memory_gib={memory_gib} holds no page (one costs "
                                 f"{bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)} bytes)")
        num_pages = _count("num_pages", num_pages, 1)
        if max_pages_per_seq is None:
            max_pages_per_seq = (-(-_count("max_seq_len", max_seq_len, 1) // page_size) if max_seq_len is not None
                                 else num_pages)
        max_pages_per_seq = _count("max_pages_per_seq", max_pages_per_seq, 1)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_seqs = max_seqs
        self.max_pages_per_seq = max_pages_per_seq
        self.dtype = dtype
        self.device = torch.device(device)

        shape = (num_pages, page_size, num_kv_heads, head_dim)
        # Zero-filled: kernels never read unwritten slots, but garbage NaNs must not exist either.
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_pages)
        # Host copy of the block tables; rows of live sequences are exact, others are zeros.
        self.block_tables_host = torch.zeros(max_seqs, max_pages_per_seq, dtype=torch.int32)
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._next_id = 0  # ids are never reused
        self._rows: dict[int, int] = {}  # live sequence id -> its block-table row
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def seq_ids(self) -> list[int]:
        return sorted(self._pages)

    def _live(self, seq_id) -> int:
        """``seq_id`` as an int, or :class:`UnknownSequenceError` (:class:`TypeError` for a non-integer)."""
        if type(seq_id) is int and seq_id in self._rows:  # the fast path
            return seq_id
        sid = _count("seq_id", seq_id, minimum=-(2**63))
        if sid in self._rows:
            return sid
        if 0 <= sid < self._next_id:
            raise UnknownSequenceError(f"sequence {sid} was freed already (sequence ids are never reused)")
        raise UnknownSequenceError(f"sequence {sid} does not exist (add_sequence() or fork() hand out ids)")

    def row(self, seq_id: int) -> int:
        """The block-table row of live sequence ``seq_id`` (rows are reused, ids are not)."""
        return self._rows[self._live(seq_id)]

    def block_table(self, seq_id: int) -> torch.Tensor:
        """Host block-table row of ``seq_id`` (int32 ``[max_pages_per_seq]``; entries past its pages are 0)."""
        return self.block_tables_host[self.row(seq_id)]

    def seq_len(self, seq_id: int) -> int:
        return self._lens[self._live(seq_id)]

    def pages(self, seq_id: int) -> list[int]:
        return list(self._pages[self._live(seq_id)])

    def pages_needed(self, seq_id: int, num_new_tokens: int) -> int:
        """Free pages an :meth:`append_slots` of ``num_new_tokens`` would take (copy-on-write included)."""
        seq_id, num_new_tokens = self._live(seq_id), _count("num_new_tokens", num_new_tokens)
        if num_new_tokens == 0:
            return 0
        pages, length = self._pages[seq_id], self._lens[seq_id]
        grow = -(-(length + num_new_tokens) // self.page_size) - len(pages)
        cow = int(length % self.page_size != 0 and self.allocator.refcount(pages[-1]) > 1)
        return grow + cow

    def can_append(self, seq_id: int, num_new_tokens: int) -> bool:
        return self.pages_needed(seq_id, num_new_tokens) <= self.num_free_pages

    def waste(self) -> float:
        """Allocated-but-unused slots / allocated slots (0.0 when nothing is allocated).

        A shared page counts once, filled as far as its fullest user.
        """
        fill: dict[int, int] = {}
        for sid, pages in self._pages.items():
            length = self._lens[sid]
            for i, p in enumerate(pages):
                fill[p] = max(fill.get(p, 0), min(self.page_size, length - i * self.page_size))
        if not fill:
            return 0.0
        allocated = len(fill) * self.page_size
        return (allocated - sum(fill.values())) / allocated

    # ------------------------------------------------------------------ lifecycle
    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id (its block-table row)."""
        if not self._free_rows:
            raise OutOfSequenceSlotsError(f"all {self.max_seqs} sequence slots are in use")
        sid = self._next_id
        self._next_id += 1
        self._rows[sid] = self._free_rows.pop()
        self._pages[sid] = []
        self._lens[sid] = 0
        return sid

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing every page (and the length) of ``seq_id``; no data is copied.

        Raises (changing nothing) :class:`UnknownSequenceError` for an id that is not live and
        :class:`OutOfSequenceSlotsError` when every row is in use.
        """
        seq_id = self._live(seq_id)
        pages = self._pages[seq_id]
        child = self.add_sequence()
        self.allocator.incref(pages)
        self._pages[child] = list(pages)
        self._lens[child] = self._lens[seq_id]
        table = self.block_tables_host
        table[self._rows[child], : len(pages)] = table[self._rows[seq_id], : len(pages)]
        return child

    def free(self, seq_id: int) -> None:
        """Release a finished (or preempted) sequence; its pages return once no one else shares them.

        The id is dead afterwards: freeing it again raises :class:`UnknownSequenceError`.
        """
        seq_id = self._live(seq_id)
        self.allocator.decref(self._pages[seq_id])
        del self._pages[seq_id], self._lens[seq_id]
        row = self._rows.pop(seq_id)
        self.block_tables_host[row].zero_()
        self._free_rows.append(row)

    def _check_fits(self, seq_id: int, num_new_tokens: int) -> None:
        total_pages = -(-(self._lens[seq_id] + num_new_tokens) // self.page_size)
        if total_pages > self.max_pages_per_seq:
            raise SequenceTooLongError(
                f"sequence {seq_id} would need {total_pages} pages (> max_pages_per_seq={self.max_pages_per_seq})"
            )

    def append_slots(self, seq_id: int, num_new_tokens: int) -> list[int]:
        """Grow ``seq_id`` by ``num_new_tokens`` (>= 0); returns their slots. All-or-nothing: raises
        :class:`OutOfPagesError` / :class:`SequenceTooLongError` without changing anything."""
        seq_id, num_new_tokens = self._live(seq_id), _count("num_new_tokens", num_new_tokens)
        pages, length = self._pages[seq_id], self._lens[seq_id]
        new_len = length + num_new_tokens
        total_pages = -(-new_len // self.page_size)
        self._check_fits(seq_id, num_new_tokens)
        needed = self.pages_needed(seq_id, num_new_tokens)
        if needed > self.allocator.num_free:
            raise OutOfPagesError(needed, self.allocator.num_free)
        if num_new_tokens == 0:
            return []
        if length % self.page_size and self.allocator.refcount(pages[-1]) > 1:
            self._copy_on_write(seq_id)
        fresh = self.allocator.allocate(total_pages - len(pages))
        if fresh:
            row = self._rows[seq_id]
            self.block_tables_host[row, len(pages) : total_pages] = torch.tensor(fresh, dtype=torch.int32)
            pages.extend(fresh)
        self._lens[seq_id] = new_len
        ps = self.page_size
        return [pages[p // ps] * ps + p % ps for p in range(length, new_len)]

    def _copy_on_write(self, seq_id: int) -> None:
        pages = self._pages[seq_id]
        old = pages[-1]
        (new,) = self.allocator.allocate(1)
        for pool in (*self.k_pools, *self.v_pools):
            pool[new].copy_(pool[old])
        self.allocator.decref([old])
        pages[-1] = new
        self.block_tables_host[self._rows[seq_id], len(pages) - 1] = new

    # ------------------------------------------------------------------ step tensors
    def plan(self, seq_ids: Sequence[int], num_new_tokens: Sequence[int]) -> StepPlan:
        """Append ``num_new_tokens[i]`` tokens to ``seq_ids[i]`` and build the step's tensors.

        All-or-nothing: when the pages do not suffice (or a sequence would grow past
        ``max_pages_per_seq``, or an argument is wrong), raises :class:`OutOfPagesError`
        (:class:`SequenceTooLongError`, ...) before touching any sequence (the scheduler preempts and
        retries). The plan's index tensors are marked package-built: the paged ops skip their value checks.
        """
        seq_ids = [self._live(s) for s in seq_ids]
        counts = [_count("num_new_tokens", n) for n in num_new_tokens]
        if len(seq_ids) != len(counts):
            raise ValueError(f"{len(seq_ids)} seq_ids but {len(counts)} num_new_tokens")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one step")
        for s, n in zip(seq_ids, counts):
            self._check_fits(s, n)
        needed = sum(self.pages_needed(s, n) for s, n in zip(seq_ids, counts))
        if needed > self.num_free_pages:
            raise OutOfPagesError(needed, self.num_free_pages)
        slots: list[int] = []
        for sid, n in zip(seq_ids, counts):
            slots.extend(self.append_slots(sid, n))
        cu = [0]
        for n in counts:
            cu.append(cu[-1] + n)
        dev = self.device
        max_count = max(counts, default=0)
        ps, width = self.page_size, self.max_pages_per_seq
        return StepPlan(
            seq_ids=seq_ids,
            slot_mapping=mark_built(torch.tensor(slots, dtype=torch.int64).to(dev), num_slots=self.num_pages * ps),
            block_tables=mark_built(self.block_tables_host[[self._rows[s] for s in seq_ids]].to(dev),
                                    num_pages=self.num_pages),
            seq_lens=mark_built(torch.tensor([self._lens[s] for s in seq_ids], dtype=torch.int32).to(dev),
                                max_len=width * ps),
            cu_seqlens_q=mark_built(torch.tensor(cu, dtype=torch.int32).to(dev), total=cu[-1], max_count=max_count),
            max_seqlen_q=max_count,
        )

    def check_invariants(self) -> None:
        """Raise if the bookkeeping is inconsistent (tests, debugging)."""
        rows = list(self._rows.values())
        if set(self._rows) != set(self._pages) or len(set(rows + self._free_rows)) != self.max_seqs \
                or len(rows) + len(self._free_rows) != self.max_seqs:
            raise AssertionError("sequence rows: a row is both live and free, used twice, or lost")
        refs = [0] * self.num_pages
        for sid, pages in self._pages.items():
            if len(pages) != -(-self._lens[sid] // self.page_size):
                raise AssertionError(f"sequence {sid}: {len(pages)} pages for {self._lens[sid]} tokens")
            if self.block_tables_host[self._rows[sid], : len(pages)].tolist() != pages:
                raise AssertionError(f"sequence {sid}: block table row out of date")
            for p in pages:
                refs[p] += 1
        if refs != self.allocator._refcount:
            raise AssertionError("page refcounts do not match the sequences' pages")
        free = self.allocator._free
        if len(set(free)) != len(free) or any(refs[p] for p in free):
            raise AssertionError("free list holds a page in use (or a page twice)")
        if len(free) + sum(r > 0 for r in refs) != self.num_pages:
            raise AssertionError("a page is neither free nor in use (leak)")

