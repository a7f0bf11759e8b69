"""Decode over a contiguous KV cache through the paged attention kernel (GQA-packed, split-K), without copies.

A decode step (or a short chunk: speculative decoding, a short prefill against a cache) hands the attention
function ``q_len <= 16`` new queries and the whole cache as contiguous key/value ``[B, Hkv, Sk, D]`` tensors
(transposed views ``[B, Sk, Hkv, D]`` here). The flash forward would run one program per query head with a
tile of 128 rows holding ``q_len`` queries: K/V read once per query head of a GQA group, long contexts on a
few SMs. The paged kernel (:mod:`hf_attn_plugin.kernels.paged`) packs the query heads of a group into one
tile and splits long contexts over programs, so this module lets it read the contiguous cache in place, as a
*virtual pool*:

* the pool is ``k`` itself, pages of one position with page stride = the position stride ``ss`` (no copy, no
  view). Position ``j`` of batch row ``b`` starts at ``b * sb + j * ss`` = page ``b * (sb / ss) + j``: the kernel
  computes it (a plan without block table, ``rows = sb / ss``) instead of loading it from a table. ``v`` likewise,
  with its own strides, ``sb / ss`` and head dim (multi-head latent attention: DeepSeek's K is 192 wide and
  ``[B, Hkv, Sk]``-major in the cache, V 128 wide and ``[B, Sk, Hkv]``-major);
* ``seq_lens`` = ``Sk`` (or each row's ``k_end``), ``k_starts`` = each row's first real key (left padding).

The kernel's semantics (queries bottom-right aligned at ``seq_len``, keys before ``k_start`` ignored, causal,
window, softcap, sinks) are :func:`hf_attn_plugin.reference.attention_reference` with the segments
:func:`hf_attn_plugin.integration.masks.segments_from_key_mask` builds for ``Sq < Sk`` (one per batch row,
``q_end = Sq``): :func:`applies` admits exactly those calls. Inference only (no autograd, no lse), Triton backend
only. ``HF_ATTN_PLUGIN_DECODE=0`` turns the route off (benchmarks compare both paths; under ``torch.compile`` it is
read when the graph is traced).

Two ways in, one launch (:func:`_launch`):

* eager (plain tensors, not traced): the launch is called directly, skipping the ``torch.library`` dispatcher,
  and the step's plan (``seq_lens``, ``k_starts``, the kernels' launch geometry and split-K buffers:
  :class:`hf_attn_plugin.kernels.paged.Plan`) is built by the step's first layer and reused by the others (same
  shapes, same segments tensor);
* traced (``torch.compile``, ``make_fx``): the custom op ``hf_attn_plugin::decode_attention`` (a fake
  implementation gives the output's shape), its index tensors built in the graph from shapes and the segments
  with plain tensor ops: no host synchronisation, nothing data-dependent on the host, no memo (a tensor kept from
  a CUDA-graph warm-up would live in the graph's memory pool), so the step is CUDA-graph capturable. The op
  declares ``needs_exact_strides``: inductor hands it K/V with the traced strides, which the pages were
  numbered for (checked again at run time).

One launch per call either way: split-K pieces are merged inside the attention kernel, and the split rule
(:func:`hf_attn_plugin.kernels.paged.default_num_splits`) cuts a small batch's cache until it fills the GPU.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Optional

import torch

from .kernels.params import AttentionParams
from .ops import backend_for

__all__ = ["MAX_Q_LEN", "applies", "attention"]

MAX_Q_LEN = 16  # longer query chunks fill the flash kernel's tiles: the flash path serves them
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PLAIN = (type(None), torch.Tensor, torch.nn.Parameter)


def enabled() -> bool:
    return os.environ.get("HF_ATTN_PLUGIN_DECODE", "1").strip() != "0"


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, sinks: torch.Tensor | None,
            key_segments: torch.Tensor | None) -> bool:
    """Whether :func:`attention` computes this call exactly (host-only checks, no tensor value is read).

    ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` as the flash op takes them; ``key_segments``:
    ``None`` or segments from a key mask (``segments_from_key_mask``). Non-causal calls with segments keep the
    flash path: there the reference zeroes query rows before ``q_start`` that the kernel would not. Traceable by
    dynamo without a graph break (shapes, strides and flags only).
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if not (0 < seqlen_q <= MAX_Q_LEN and seqlen_q < seqlen_k) or (key_segments is not None and not causal):
        return False
    if not enabled():
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (sinks is not None and sinks.requires_grad)):  # no backward here
        return False
    if q.dtype not in _KERNEL_DTYPES or backend_for(q.device) != "triton":
        return False
    if key_segments is not None and key_segments.shape[0] != q.shape[0]:
        return False
    return _virtual_pool_rows(k, v) is not None


def _virtual_pool_rows(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int] | None:
    """``(rows_k, rows_v)``: ``sb / ss`` (pages per batch row) of ``k`` and of ``v`` when both can be read as virtual
    pools, else None. Their head dims and strides may differ (MLA)."""
    rows = _rows(k), _rows(v)
    # Page (b * rows + j) is position j of row b: every page the kernel reads (j < the row's length <= Sk) is a
    # valid position of its tensor.
    return None if None in rows else rows


def _rows(t: torch.Tensor) -> int | None:
    """Pages per batch row of ``t`` ``[B, Sk, Hkv, D]`` seen as pages of one position (None: not addressable)."""
    sb, ss, _, sd = t.stride()  # one call (each stride(i) is a call: this runs twice per layer and step)
    if sd != 1 or ss <= 0:
        return None
    if t.shape[0] == 1:
        return t.shape[1]
    return sb // ss if sb % ss == 0 else None


# --------------------------------------------------------------------------- index tensors and the step's plan
def _index_tensors(batch: int, seqlen_q: int, seqlen_k: int, key_segments: torch.Tensor | None,
                   device: torch.device):
    """``(seq_lens, cu_seqlens_q, k_starts)`` of a call, int32, from shapes and the key segments (columns 3 and 4:
    each row's first real key and ``k_end``) with plain tensor ops: nothing read back to the host."""
    if key_segments is not None:
        k_starts, seq_lens = key_segments[:, 3].contiguous(), key_segments[:, 4].contiguous()
    else:
        k_starts, seq_lens = None, torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
    cu_seqlens_q = None
    if seqlen_q > 1:
        cu_seqlens_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=device)
    return seq_lens, cu_seqlens_q, k_starts


def _new_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[int, int], index: tuple,
              num_splits: int):
    """The kernels' :class:`~hf_attn_plugin.kernels.paged.Plan` for a call (``rows``: :func:`_virtual_pool_rows`,
    ``index``: :func:`_index_tensors`)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seq_lens, cu_seqlens_q, k_starts = index
    pool_shape = ((batch - 1) * rows[0] + k.shape[1], 1, k.shape[2], k.shape[3])
    return _kernels().Plan((batch * seqlen_q, heads_q, head_dim), q.dtype, q.device, pool_shape, None, seq_lens,
                           cu_seqlens_q, seqlen_q, k_starts, num_splits, rows=rows[0], rows_v=rows[1],
                           capacity=k.shape[1], head_dim_v=v.shape[-1])


# Eager: the last step's plan (index tensors, launch geometry, split-K buffers), shared by every layer of the step:
# they have the same shapes and receive the same segments tensor (which nothing modifies in place). One entry,
# replaced by one assignment; keyed by thread as well, so models run from several threads never share a plan's
# partial buffers (the layers of one thread run one after another).
_LAST_PLAN: list = [None]  # (key, weakref to the segments or None, plan)


def _step_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[int, int],
               key_segments: torch.Tensor | None, num_splits: int):
    key = (threading.get_ident(), q.shape, k.shape, v.shape[-1], rows, q.dtype, q.device, num_splits)
    entry = _LAST_PLAN[0]
    if entry is not None and entry[0] == key and (entry[1] is None if key_segments is None
                                                  else entry[1] is not None and entry[1]() is key_segments):
        return entry[2]
    index = _index_tensors(q.shape[0], q.shape[1], k.shape[1], key_segments, q.device)
    plan = _new_plan(q, k, v, rows, index, num_splits)
    _LAST_PLAN[0] = (key, None if key_segments is None else weakref.ref(key_segments), plan)
    return plan


# --------------------------------------------------------------------------- the launch and the custom op
def _kernels():
    """The paged kernels module, imported on first use (importing it compiles nothing, but pulls in Triton)."""
    global _PAGED
    if _PAGED is None:
        from .kernels import paged

        _PAGED = paged
    return _PAGED


_PAGED = None


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[int, int], plan, params) -> torch.Tensor:
    """The paged kernel on the virtual pools of ``k``/``v`` (``rows``: their pages per batch row) with the call's
    ``plan`` (:func:`_new_plan`); a contiguous ``[B, Sq, Hq, Dv]`` output."""
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):  # Triton launches on the current device (layers spread by device_map)
            return _launch(q, k, v, rows, plan, params)
    batch, seqlen_q, heads_q, head_dim = q.shape
    q3 = q.reshape(batch * seqlen_q, heads_q, head_dim)  # a view for decode (Sq = 1); a small copy otherwise
    if not q3.is_contiguous():
        q3 = q3.contiguous()
    out = _kernels().run(q3, k, v, plan, params)  # a plan without table reads the caches as pools
    return out.view(batch, seqlen_q, heads_q, v.shape[-1])


@torch.library.custom_op("hf_attn_plugin::decode_attention", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    k_starts: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    rows: int,
    rows_v: int,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    num_splits: int,
) -> torch.Tensor:
    if _virtual_pool_rows(k, v) != (rows, rows_v):
        raise RuntimeError(
            f"hf_attn_plugin::decode_attention: the call was traced for K/V with {rows}/{rows_v} positions per batch "
            f"row, but K/V arrived with strides {tuple(k.stride())} / {tuple(v.stride())} (shape {tuple(k.shape)}): "
            "the compiler changed their layout. Please report this; HF_ATTN_PLUGIN_DECODE=0 avoids the route."
        )
    plan = _new_plan(q, k, v, (rows, rows_v), (seq_lens, cu_seqlens_q, k_starts), num_splits)
    return _launch(q, k, v, (rows, rows_v), plan, AttentionParams(scale, causal, window, softcap, sinks))


@_decode_op.register_fake
def _(q, k, v, seq_lens, cu_seqlens_q, k_starts, sinks, rows, rows_v, scale, causal, window, softcap,
      num_splits):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: AttentionParams | None = None,
    *,
    key_segments: torch.Tensor | None = None,
    num_splits: int = 0,
    **options,
) -> torch.Tensor:
    """Attention of ``q`` ``[B, Sq, Hq, D]`` over the cache ``k`` ``[B, Sk, Hkv, D]`` / ``v`` ``[B, Sk, Hkv, Dv]``;
    ``[B, Sq, Hq, Dv]``.

    Only for calls :func:`applies` admits. ``params``: an :class:`~hf_attn_plugin.ops.AttentionParams` (the
    integration's), or its keywords (``scale``, ``causal``, ``window``, ``softcap``, ``sinks``); its ``segments``
    are not read. ``key_segments``: segments from a key mask (left padding, a static cache's empty tail): row ``b``
    attends to keys ``[k_start, k_end)`` with its queries ending at ``k_end``. ``num_splits``: split-K grid size
    (0: from the shapes and the SM count; tests force splits with it).
    """
    params = AttentionParams.resolve(params, q.shape[-1], options)
    rows = _virtual_pool_rows(k, v)
    if not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in (q, k, v, params.sinks, key_segments)):
        # eager, plain tensors: launch directly (the op boundary is only for tracers), the step's plan memoised
        return _launch(q, k, v, rows, _step_plan(q, k, v, rows, key_segments, num_splits), params)
    seq_lens, cu_seqlens_q, k_starts = _index_tensors(q.shape[0], q.shape[1], k.shape[1], key_segments, q.device)
    return _decode_op(q, k, v, seq_lens, cu_seqlens_q, k_starts, params.sinks, *rows, params.scale,
                      params.causal, params.window, params.softcap, num_splits)
