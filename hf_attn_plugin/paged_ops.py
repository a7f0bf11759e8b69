"""Paged-attention custom ops and the direct API (inference only: no autograd).

Two entry points, each a ``torch.library`` custom op with a fake registration (so ``torch.compile``
sees one opaque call). Eager calls without autograd run the same implementation directly, skipping the
dispatcher's host cost (``_direct``); CUDA graphs capture the kernels either way:

* :func:`write_kv` ``(k_pool, v_pool, k_new, v_new, slot_mapping)``: store new tokens' K/V in their
  slots (mutates the pools).
* :func:`paged_attention` ``(q, k_pool, v_pool, block_tables, seq_lens, ...) -> out``: attention of
  new query tokens over the paged cache (which already holds them: call :func:`write_kv` first).

Layout (see :mod:`hf_attn_plugin.paged.allocator`): pools ``[num_pages, page_size, H_kv, D]``;
``block_tables`` int32 ``[num_seqs, max_pages_per_seq]``; ``seq_lens`` int32 ``[num_seqs]`` counts
the cached tokens including the new ones; ``slot_mapping`` int64 ``[T]`` = ``page * page_size +
offset`` (``-1``: skip). q/out are ``[T, H_q, D]``; decode is one token per sequence (``T ==
num_seqs``, ``cu_seqlens_q=None``), prefill/chunked prefill pass ``cu_seqlens_q`` int32
``[num_seqs + 1]`` (rows of q per sequence; ``cu_seqlens_q[-1] == T``).

Semantics: :func:`hf_attn_plugin.reference.attention_reference` on each sequence's gathered
cache ``[1, L, H_kv, D]`` with one segment ``(0, 0, n, k_start, L)`` (bottom-right aligned: the
``n`` new tokens are the last ``n`` positions). The backend follows
:func:`hf_attn_plugin.ops.backend_for`: Triton kernels on CUDA (or CPU under ``TRITON_INTERPRET=1``
with ``HF_ATTN_PLUGIN_BACKEND=triton``), the gathering reference elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .ops import backend_for

__all__ = ["paged_attention", "write_kv", "gather_kv", "paged_attention_reference"]


# --------------------------------------------------------------------------- reference path
def gather_kv(pool: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached tokens as a contiguous ``[1, length, H_kv, D]``."""
    page_size = pool.shape[1]
    num_pages = -(-length // page_size)
    pages = block_table[:num_pages].to(device=pool.device, dtype=torch.long)
    return pool.index_select(0, pages).flatten(0, 1)[:length].unsqueeze(0)


def paged_attention_reference(
    q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal, window, softcap
) -> torch.Tensor:
    """Gather each sequence's pages and run :func:`attention_reference` on it (the CPU path / oracle)."""
    num_seqs = seq_lens.shape[0]
    lens = seq_lens.tolist()
    cu = cu_seqlens_q.tolist() if cu_seqlens_q is not None else list(range(num_seqs + 1))
    starts = k_starts.tolist() if k_starts is not None else [0] * num_seqs
    out = torch.zeros_like(q)
    for b in range(num_seqs):
        q0, q1, length = cu[b], cu[b + 1], lens[b]
        if q1 == q0:
            continue
        k = gather_kv(k_pool, block_tables[b], length)
        v = gather_kv(v_pool, block_tables[b], length)
        seg = torch.tensor([[0, 0, q1 - q0, starts[b], length]], dtype=torch.int32)
        o, _ = reference.attention_reference(
            q[q0:q1].unsqueeze(0), k, v, scale=scale, causal=causal, window=window or None,
            softcap=softcap or None, sinks=sinks, segments=seg,
        )
        out[q0:q1] = o[0]
    return out


def _write_kv_reference(k_pool, v_pool, k_new, v_new, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    for pool, new in ((k_pool, k_new), (v_pool, v_new)):
        flat = pool.view(-1, *pool.shape[2:])  # pools are contiguous: a view, written in place
        flat.index_copy_(0, slots, new[keep].to(pool.dtype))


# --------------------------------------------------------------------------- custom ops
def _write_kv_impl(k_pool, v_pool, k_new, v_new, slot_mapping) -> None:
    if backend_for(k_pool.device) == "triton":
        from .kernels import paged

        paged.write_kv(k_pool, v_pool, k_new, v_new, slot_mapping)
    else:
        _write_kv_reference(k_pool, v_pool, k_new, v_new, slot_mapping)


@torch.library.custom_op("hf_attn_plugin::paged_write_kv", mutates_args=("k_pool", "v_pool"))
def _write_kv_op(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _write_kv_impl(k_pool, v_pool, k_new, v_new, slot_mapping)


@_write_kv_op.register_fake
def _(k_pool, v_pool, k_new, v_new, slot_mapping):
    return None


def _paged_attention_impl(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal,
                          window, softcap, num_splits, max_seqlen_q) -> torch.Tensor:
    if backend_for(q.device) == "triton":
        from .kernels import paged

        return paged.paged_attention(
            q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, sinks,
            scale, causal, window, softcap, num_splits,
        )
    return paged_attention_reference(
        q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal, window, softcap
    )


@torch.library.custom_op("hf_attn_plugin::paged_attention", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    k_starts: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    num_splits: int,
    max_seqlen_q: int,
) -> torch.Tensor:
    return _paged_attention_impl(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale,
                                 causal, window, softcap, num_splits, max_seqlen_q)


@_paged_attention_op.register_fake
def _(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal, window, softcap,
      num_splits, max_seqlen_q):
    return torch.empty_like(q)


def _direct(*tensors: torch.Tensor) -> bool:
    """Run an op's implementation directly (skipping the ``torch.library`` dispatcher, ~50-150 us a call on the
    host) when nothing needs the op boundary: not traced by dynamo, plain tensors (no fake/functional tensors
    from ``make_fx``/export), and no autograd (the ops have no backward; through the op a ``requires_grad``
    input raises instead of silently returning a tensor without history)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and not (grad and t.requires_grad) for t in tensors)


def _write_kv(k_pool, v_pool, k_new, v_new, slot_mapping) -> None:
    """:func:`write_kv` without the argument checks (for callers that built the arguments themselves)."""
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    k_new, v_new = k_new.to(k_pool.dtype), v_new.to(v_pool.dtype)
    if _direct(k_pool, k_new, v_new):
        _write_kv_impl(k_pool, v_pool, k_new, v_new, slot_mapping)
    else:
        _write_kv_op(k_pool, v_pool, k_new, v_new, slot_mapping)


def _paged_attention(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale: float,
                     causal: bool, window: int, softcap: float, num_splits: int, max_seqlen_q: int) -> torch.Tensor:
    """:func:`paged_attention` without the argument checks: every argument normalised (``window``/``softcap``/
    ``num_splits`` 0 = off/auto, host ``max_seqlen_q``), ``q`` with a unit last stride."""
    args = (q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks, scale, causal, window, softcap,
            num_splits, max_seqlen_q)
    if _direct(q, k_pool, v_pool) and (sinks is None or _direct(sinks)):
        return _paged_attention_impl(*args)
    return _paged_attention_op(*args)


# --------------------------------------------------------------------------- public API
def write_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k_new``/``v_new`` ``[T, H_kv, D]`` into ``k_pool``/``v_pool`` at ``slot_mapping`` ``[T]``.

    ``slot = page * page_size + offset``; negative slots are skipped (padding tokens). Slots must be
    distinct (the allocator guarantees it).
    """
    if k_new.shape != v_new.shape or k_new.dim() != 3:
        raise ValueError(f"k_new/v_new must both be [T, H_kv, D], got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if k_pool.shape != v_pool.shape or k_pool.dim() != 4 or k_pool.shape[2:] != k_new.shape[1:]:
        raise ValueError(f"pools {tuple(k_pool.shape)} do not match new tokens {tuple(k_new.shape)}")
    if slot_mapping.shape != (k_new.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k_new.shape[0]}], got {tuple(slot_mapping.shape)}")
    _write_kv(k_pool, v_pool, k_new, v_new, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    k_starts: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` ``[T, H_q, D]`` over a paged KV cache; returns ``[T, H_q, D]`` (q's dtype).

    * decode: ``cu_seqlens_q=None``, ``T == num_seqs`` (query ``b`` is sequence ``b``'s last token).
      Sync-free and of a fixed grid for given shapes and ``num_splits``: CUDA-graph capturable.
    * prefill / chunked prefill / mixed: ``cu_seqlens_q`` int32 ``[num_seqs+1]``; ``max_seqlen_q``
      (host int) bounds the per-sequence query count (read from ``cu_seqlens_q`` when omitted: a sync).
    * ``k_starts`` int32 ``[num_seqs]``: cached positions before it are padding (left-padded batches).
    * ``window`` (keys ``j > pos - window``), ``softcap``, ``sinks`` ``[H_q]``: as in
      :mod:`hf_attn_plugin.reference`. ``scale`` defaults to ``D ** -0.5``.
    * ``num_splits``: split-K factor over the context (``None``: from shapes and the SM count).
    """
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"expected q [T, Hq, D] and pools [pages, page_size, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if q.shape[-1] != k_pool.shape[-1] or q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)} (head_dim, GQA grouping)")
    if q.dtype != k_pool.dtype or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("k_starts", k_starts)):
        if t is not None and t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32")
    if cu_seqlens_q is None and q.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"decode takes one query per sequence: q has {q.shape[0]} tokens, {seq_lens.shape[0]} sequences")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"sinks must be [Hq={q.shape[1]}], got {tuple(sinks.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if cu_seqlens_q is None:
        max_seqlen_q = 1
    elif max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if cu_seqlens_q.numel() > 1 else 0
    return _paged_attention(
        q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, k_starts, sinks,
        float(q.shape[-1] ** -0.5 if scale is None else scale), bool(causal),
        int(window) if window else 0, float(softcap) if softcap else 0.0,
        int(num_splits) if num_splits else 0, int(max_seqlen_q),
    )
