"""Decode over a contiguous KV cache through the paged attention kernel (GQA-packed, split-K), without copies.

A decode step (or a short chunk: speculative decoding, a short prefill against a cache) hands the attention
function ``q_len <= 16`` new queries and the whole cache as contiguous key/value ``[B, Hkv, Sk, D]`` tensors
(transposed views ``[B, Sk, Hkv, D]`` here). The flash forward would run one program per query head with a
tile of 128 rows holding ``q_len`` queries: K/V read once per query head of a GQA group, long contexts on a
few SMs. The paged kernel (:mod:`hf_attn_plugin.kernels.paged`) packs the query heads of a group into one
tile and splits long contexts over programs, so this module lets it read the contiguous cache in place, as a
*virtual pool*:

* the pool is ``k`` itself seen as ``[num_pages, 1, Hkv, D]`` pages of one position, page stride = the
  position stride ``ss`` (``k.as_strided``: no copy). Position ``j`` of batch row ``b`` starts at
  ``b * sb + j * ss`` = page ``b * (sb / ss) + j``, so the block table is ``b * (sb / ss) + arange(Sk)``
  (built once per step and shape, shared by every layer of the step);
* ``seq_lens`` = ``Sk`` (or each row's ``k_end``), ``k_starts`` = each row's first real key (left padding).

The kernel's semantics (queries bottom-right aligned at ``seq_len``, keys before ``k_start`` ignored, causal,
window, softcap, sinks) are :func:`hf_attn_plugin.reference.attention_reference` with the segments
:func:`hf_attn_plugin.integration.masks.segments_from_key_mask` builds for ``Sq < Sk`` (one per batch row,
``q_end = Sq``): :func:`applies` admits exactly those calls. Inference only (no autograd, no lse), eager only
(under ``torch.compile`` the flash op keeps the graph opaque and unchanged), Triton backend only.
``HF_ATTN_PLUGIN_DECODE=0`` turns the route off (benchmarks compare both paths).
"""

from __future__ import annotations

import os
import weakref

import torch

from .ops import backend_for

__all__ = ["MAX_Q_LEN", "applies", "attention"]

MAX_Q_LEN = 16  # longer query chunks fill the flash kernel's tiles: the flash path serves them
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1
_PLAIN = (type(None), torch.Tensor, torch.nn.Parameter)


def enabled() -> bool:
    return os.environ.get("HF_ATTN_PLUGIN_DECODE", "1").strip() != "0"


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, sinks: torch.Tensor | None,
            key_segments: torch.Tensor | None) -> bool:
    """Whether :func:`attention` computes this call exactly (host-only checks, no tensor value is read).

    ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` as the flash op takes them; ``key_segments``:
    ``None`` or segments from a key mask (``segments_from_key_mask``). Non-causal calls with segments keep the
    flash path: there the reference zeroes query rows before ``q_start`` that the kernel would not.
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if not (0 < seqlen_q <= MAX_Q_LEN and seqlen_q < seqlen_k) or (key_segments is not None and not causal):
        return False
    if torch.compiler.is_compiling() or not enabled():
        return False
    tensors = (q, k, v) if sinks is None else (q, k, v, sinks)
    if any(type(t) is not torch.Tensor for t in (q, k, v)) or type(sinks) not in _PLAIN:  # fake / functional /
        return False  # subclass tensors (sinks are a model's Parameter): the op path
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):  # no backward here
        return False
    if q.dtype not in _KERNEL_DTYPES or backend_for(q.device) != "triton":
        return False
    if key_segments is not None and key_segments.shape[0] != q.shape[0]:
        return False
    return _virtual_pool_rows(k, v) is not None


def _virtual_pool_rows(k: torch.Tensor, v: torch.Tensor) -> int | None:
    """``sb / ss`` (pages per batch row) when ``k`` and ``v`` can both be read as virtual pools, else None."""
    batch, seqlen_k = k.shape[0], k.shape[1]
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride(1) <= 0 or k.stride(1) != v.stride(1):
        return None
    ss = k.stride(1)
    if batch > 1:
        if k.stride(0) % ss or k.stride(0) != v.stride(0):
            return None
        rows = k.stride(0) // ss
    else:
        rows = seqlen_k
    if (batch - 1) * rows + seqlen_k > _INT32_MAX:  # block-table entries are int32
        return None
    # Page (b * rows + j) is position j of row b: every page the table names is a valid position of the tensor,
    # so the pool view (as_strided, which checks its bounds) lies inside the storage.
    return rows


def _pool(t: torch.Tensor, num_pages: int) -> torch.Tensor:
    """``t`` ``[B, Sk, Hkv, D]`` as a pool ``[num_pages, 1, Hkv, D]`` of one-position pages (a view)."""
    ss = t.stride(1)
    return t.as_strided((num_pages, 1, t.shape[2], t.shape[3]), (ss, ss, t.stride(2), 1), t.storage_offset())


# Per-step tensors, shared by every layer of a step (one entry each: the step's shapes change every step). Each
# entry is replaced by one assignment, so threads running models concurrently never see half an entry.
_LAST_TABLE: list = [None]  # (key, (block_table, seq_lens))
_LAST_BOUNDS: list = [None]  # (weakref to segments, (k_starts, seq_lens))
_CU_SEQLENS: dict = {}


def _block_table(batch: int, rows: int, seqlen_k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_table [B, Sk], seq_lens [B])`` int32: page ``b * rows + j`` for position ``j`` of row ``b``."""
    key = (batch, rows, seqlen_k, device)
    entry = _LAST_TABLE[0]
    if entry is None or entry[0] != key:
        positions = torch.arange(seqlen_k, dtype=torch.int32, device=device)
        if batch == 1:
            table = positions.unsqueeze(0)
        else:
            starts = torch.arange(0, batch * rows, rows, dtype=torch.int32, device=device)
            table = starts[:, None] + positions[None, :]
        entry = (key, (table, torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)))
        _LAST_TABLE[0] = entry
    return entry[1]


def _key_bounds(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_starts, seq_lens)`` = columns 3 and 4 of the step's segments, contiguous (memoised per tensor:
    every layer of a step receives the same segments object, which nothing modifies in place)."""
    entry = _LAST_BOUNDS[0]
    if entry is None or entry[0]() is not segments:
        entry = (weakref.ref(segments), (segments[:, 3].contiguous(), segments[:, 4].contiguous()))
        _LAST_BOUNDS[0] = entry
    return entry[1]


def _cu_seqlens(batch: int, seqlen_q: int, device: torch.device) -> torch.Tensor:
    key = (batch, seqlen_q, device)
    cu = _CU_SEQLENS.get(key)
    if cu is None:
        if len(_CU_SEQLENS) > 64:
            _CU_SEQLENS.clear()
        cu = _CU_SEQLENS[key] = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    return cu


def _kernels():
    """The paged kernels module, imported on first use (importing it compiles nothing, but pulls in Triton)."""
    global _PAGED
    if _PAGED is None:
        from .kernels import paged

        _PAGED = paged
    return _PAGED


_PAGED = None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    key_segments: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Attention of ``q`` ``[B, Sq, Hq, D]`` over the cache ``k``/``v`` ``[B, Sk, Hkv, D]``; ``[B, Sq, Hq, D]``.

    Only for calls :func:`applies` admits. ``key_segments``: segments from a key mask (left padding, a static
    cache's empty tail): row ``b`` attends to keys ``[k_start, k_end)`` with its queries ending at ``k_end``.
    ``num_splits``: split-K grid size (0: from the shapes and the SM count; tests force splits with it).
    """
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):  # Triton launches on the current device (layers spread by device_map)
            return attention(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks,
                             key_segments=key_segments, num_splits=num_splits)
    paged = _kernels()
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k = k.shape[1]
    rows = _virtual_pool_rows(k, v)
    table, seq_lens = _block_table(batch, rows, seqlen_k, q.device)
    k_starts = None
    if key_segments is not None:
        k_starts, seq_lens = _key_bounds(key_segments)
    num_pages = (batch - 1) * rows + seqlen_k
    q3 = q.reshape(batch * seqlen_q, heads_q, head_dim)  # a view for decode (Sq = 1); a small copy otherwise
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    cu_seqlens_q = None if seqlen_q == 1 else _cu_seqlens(batch, seqlen_q, q.device)
    out = paged.paged_attention(
        q3, _pool(k, num_pages), _pool(v, num_pages), table, seq_lens, cu_seqlens_q, seqlen_q, k_starts, sinks,
        float(scale), bool(causal), int(window) if window else 0, float(softcap) if softcap else 0.0, num_splits,
    )
    return out.view(batch, seqlen_q, heads_q, head_dim)
