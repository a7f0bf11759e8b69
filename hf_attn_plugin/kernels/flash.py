"""FlashAttention-2 forward and backward in Triton, with the semantics of :mod:`hf_attn_plugin.reference`.

Layout ``[B, S, H, D]`` with arbitrary strides (the last dimension must be unit-stride; it is made
so otherwise). GQA/MQA is native: query head ``h`` reads KV head ``h // group``. The value head dim ``Dv`` may
differ from the query/key one ``D`` (MLA: DeepSeek-V2/V3, D 192 and Dv 128): every kernel takes it as its own
constexpr (``HEAD_DIM_V``, tiles ``BLOCK_DV`` wide) next to ``HEAD_DIM`` / ``BLOCK_D``; q, k, dq, dk are ``D``
wide, v, out, dout, dv ``Dv`` wide (``Dv == D`` compiles exactly the kernels it did before).

Kernels

* ``_attn_fwd``: one program per (query tile, segment x query head). Online softmax in base 2:
  logits are prescaled by ``scale * log2(e)`` so every exponential is one ``exp2`` (the score, mask and
  online-softmax pieces are :mod:`.primitives`, shared with the paged kernels). Saves the
  natural-log LSE for the backward. K/V tiles are loaded with TMA through descriptors built in the
  kernel, bounded by the program's segment (Triton needs a scratch allocator for them: set at launch
  unless the caller set one).
* ``_bwd_preprocess``: ``delta_i = rowsum(dO_i * O_i)``.
* ``_attn_bwd_dkdv``: one program per (key tile, segment x KV head); it loops over the group's query
  heads, so dK/dV of a KV head are accumulated in registers and written once: no atomics,
  deterministic. A ``two_pass`` launch config runs it twice (``WANT_DV``, then ``WANT_DK``), one
  accumulator per program: the D 256 bucket's tiles then fit Hopper's wgmma without spilling.
* ``_attn_bwd_dq``: one program per (query tile, segment x query head).

The forward and dK/dV kernels have a warp-specialized form (``WARP_SPEC``, a tuning candidate): Triton splits
the program into a producer warpgroup issuing TMA loads and two consumer warpgroups. Triton 3.6 only accepts one
loop with no early return and no branch inside it, so that form runs a single masked loop (dK/dV: over
(query head, query tile) pairs, Q/dO through 3-D descriptors) instead of the three phases below.

Masks and loop bounds. Inside a segment, local query row ``r`` sits at key position ``r + off``
with ``off = len_k - len_q`` (bottom-right alignment) and sees key column ``c`` iff
``c <= r + off`` (causal) and ``c > r + off - W`` (window). For a tile of rows, the key loop is split
in three: ``[lo, full_lo)`` window-edge tiles (masked), ``[full_lo, full_hi)`` tiles every row sees
entirely (no mask, no bounds checks), ``[full_hi, hi)`` diagonal / ragged-end tiles (masked). ``lo``
and ``hi`` are the first and last visible columns of the tile's rows, so tiles outside the window or
above the diagonal are never loaded. The dK/dV kernel does the same over query tiles.

Fully masked rows keep ``m = -inf`` and ``l = 0``; the masked phases substitute 0 for an all
``-inf`` running max so that ``exp2(-inf - -inf)`` never appears, and the epilogue writes
``out = 0, lse = 0``. Sinks start the online softmax at ``m = sink * log2(e), l = 1`` (one extra
logit with no value row).

Dropout (``DROPOUT``, training): the forward drops probabilities after they enter ``l`` (the LSE ignores
dropout) and scales the output by ``1 / (1 - p)``; the backward regenerates the same mask (``_dropout_keep``:
Philox of the seed and the (batch, head, query, key) coordinates, never stored), uses the dropped probabilities
for dV and masks dP. ``delta = rowsum(dO * O)`` with the dropped ``O`` is still ``rowsum(P * dP)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import configs
from .host import cdiv, next_power_of_2, relauncher, tma_ready
from .primitives import (LENGTH_ARGS, LN2, LOG2E, finish_softmax, mask_scores, online_softmax_step, score_scales,
                         scores, scores_grad)
from .params import AttentionParams

__all__ = ["flash_attn_forward", "flash_attn_backward", "SUPPORTED_HEAD_DIMS", "check_head_dim", "dropout_mask"]

# Every multiple of 8 from 16 to 256 (what Hugging Face models use). Tiles are BLOCK_D = next_pow2(D) wide with
# masked columns. Why each of these fits a TMA descriptor (global [rows, D], strides [row_stride, 1], box
# [BLOCK_N, BLOCK_D]): D * element size is a multiple of 16 bytes for D % 8 == 0 at 2 and 4 bytes per element, so
# the row (and head/batch) strides of a packed tensor are 16-byte aligned (other views are copied by tma_ready);
# the inner box is >= 32 bytes (BLOCK_D >= 16) and Triton splits a box wider than its swizzle (128 bytes) into
# several copies; every box dimension is <= 256 (BLOCK_D <= 256, tiles <= 128 rows); columns past D and rows past
# the segment are filled with zeros by the TMA unit. tl.dot needs an inner dimension >= 16: hence the minimum.
HEAD_DIM_MULTIPLE, MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 16, 256
SUPPORTED_HEAD_DIMS = tuple(range(MIN_HEAD_DIM, MAX_HEAD_DIM + 1, HEAD_DIM_MULTIPLE))

# Tests set this to fill freshly allocated (fully overwritten) outputs with NaN.
POISON = False


# ----------------------------------------------------------------------------------------------
# Small helpers (inlined by Triton)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _segment(seg_ptr, pid_bh, heads, seqlen_q, seqlen_k, SEGMENTS: tl.constexpr):
    """(batch, head, q_start, k_start, len_q, len_k) of program ``pid_bh = segment * heads + head``."""
    seg = pid_bh // heads
    head = pid_bh % heads
    if SEGMENTS:
        row = seg_ptr + seg * 5
        batch = tl.load(row)
        q_start = tl.load(row + 1)
        len_q = tl.load(row + 2) - q_start
        k_start = tl.load(row + 3)
        len_k = tl.load(row + 4) - k_start
    else:
        batch = seg
        q_start = seg * 0
        k_start = seg * 0
        len_q = seqlen_q + seg * 0
        len_k = seqlen_k + seg * 0
    return batch, head, q_start, k_start, len_q, len_k


@triton.jit
def _load_rows(base, stride, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a ``[BLOCK, BLOCK_D]`` tile of rows ``base + i * stride`` (zeros past ``n_rows`` / ``HEAD_DIM``)."""
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if BLOCK_D != HEAD_DIM:
            mask = mask & (cols[None, :] < HEAD_DIM)
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows(base, stride, n_rows, x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride + cols[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_keep(seed, bh, rows, cols, drop_p):
    """Dropout mask: True where the probability of query ``rows`` / key ``cols`` (positions in the padded
    ``[Sq]`` / ``[Sk]`` layout, broadcast against each other) of ``bh = batch * heads_q + head`` is kept.

    Philox keyed by the 64-bit ``seed`` with counter ``(col, row, bh, 0)``: the bits depend on the coordinates
    only, never on the tiling, so the forward, both backward kernels and :func:`dropout_mask` agree. Kept iff a
    uniform in ``[0, 1)`` (the top 24 bits) is ``>= drop_p``."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, cols.to(tl.uint32) + zero, rows.to(tl.uint32) + zero, zero + bh.to(tl.uint32),
                              zero)
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0) >= drop_p


@triton.jit
def _dropout_mask_kernel(Seed, Keep, seqlen_q, seqlen_k, drop_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Keep[bh, i, j] = _dropout_keep(...)`` as int8 (tests materialise the kernels' mask with it)."""
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), bh, rows[:, None], cols[None, :], drop_p)
    ptrs = Keep + bh.to(tl.int64) * seqlen_q * seqlen_k + rows[:, None].to(tl.int64) * seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


@triton.jit
def _kv_range(m0, len_q, len_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key-tile loop bounds for query rows ``[m0, m0 + BLOCK_M)``: masked ``[lo, p1)``,
    unmasked ``[full_lo, full_hi)``, masked ``[full_hi, hi)``; all starts are multiples of BLOCK_N."""
    off = len_k - len_q
    lo = len_k * 0
    hi = len_k
    if CAUSAL:  # last row's last visible key + 1
        hi = tl.minimum(hi, m0 + BLOCK_M + off)
    if WINDOW:  # first row's first visible key, rounded down to a tile
        lo = tl.maximum(m0 + off - window + 1, 0) // BLOCK_N * BLOCK_N
    full_lo = lo
    if WINDOW:  # first tile the last row sees entirely
        full_lo = tl.maximum(lo, (tl.maximum(m0 + BLOCK_M + off - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_hi = len_k // BLOCK_N * BLOCK_N  # no ragged end
    if CAUSAL:  # tiles ending at or before the first row's diagonal
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + off + 1, 0) // BLOCK_N * BLOCK_N)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, tl.minimum(full_lo, hi), full_lo, full_hi, hi


@triton.jit
def _q_range(n0, len_q, len_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query-tile loop bounds for key columns ``[n0, n0 + BLOCK_N)`` (same three phases)."""
    off = len_k - len_q
    lo = len_q * 0
    hi = len_q
    if CAUSAL:  # first row that sees column n0
        lo = tl.maximum(n0 - off, 0) // BLOCK_M * BLOCK_M
    if WINDOW:  # rows r < c - off + W see column c; c = last column of the tile
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 - off + window)
    full_lo = lo
    if CAUSAL:  # first tile whose rows all see the tile's last column
        full_lo = tl.maximum(lo, (tl.maximum(n0 + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    full_hi = len_q // BLOCK_M * BLOCK_M
    if WINDOW:  # tiles whose last row still sees the tile's first column
        full_hi = tl.minimum(full_hi, tl.maximum(n0 - off + window, 0) // BLOCK_M * BLOCK_M)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, tl.minimum(full_lo, hi), full_lo, full_hi, hi


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, m0, start, end, len_q, len_k, window,
               sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
               MASKED: tl.constexpr, WARP_SPEC: tl.constexpr):
    """K/V tiles come through TMA descriptors bounded by the segment: rows past ``len_k`` and columns past
    ``HEAD_DIM`` (K) / ``HEAD_DIM_V`` (V) load as zeros (the masked phases also mask those scores)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    pos = rows[:, None] + (len_k - len_q)  # key position of each query row (bottom-right aligned)
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = k_desc.load([start_n, 0])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = scores(qk, sm_scale2, cap_scale, cap2, SOFTCAP)
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            s = mask_scores(s, pos, cols[None, :], 0, len_k, window, CHECK_START=False, CHECK_END=True,
                            CAUSAL=CAUSAL, WINDOW=WINDOW)
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, MASKED)
        if DROPOUT:  # l (hence the LSE) sums every probability; only the P @ V product drops some
            keep = _dropout_keep(seed, bh, q_start + rows[:, None], k_start + start_n + tl.arange(0, BLOCK_N)[None, :],
                                 drop_p)
            p = tl.where(keep, p, 0.0)
        v = v_desc.load([start_n, 0])
        acc = acc * alpha[:, None]
        # P in the input dtype (bf16 or fp16; fp32 stays fp32 with ieee dots).
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize_on_alignment=LENGTH_ARGS + ("stride_lb", "stride_lh"))
def _attn_fwd(
    Q, K, V, Out, Lse, Segments, Sinks, Seed,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_q, group, window,
    sm_scale2, cap_scale, cap2, drop_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
    SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr, DROPOUT: tl.constexpr,
):
    # Heaviest (last) causal tiles first: better tail behaviour.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, head, q_start, k_start, len_q, len_k = _segment(Segments, pid_bh, heads_q, seqlen_q, seqlen_k, SEGMENTS)
    m0 = pid_m * BLOCK_M
    if not WARP_SPEC:  # (Triton's Hopper warp specialization rejects an early return: see the key loop below)
        if m0 >= len_q:
            return
    kv_head = head // group
    batch64 = batch.to(tl.int64)
    q_seg = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
    k_base = K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    if WARP_SPEC:  # the producer warps issue every load, so Q comes through TMA as well
        rows_q = tl.maximum(len_q, 1)
        q_desc = tl.make_tensor_descriptor(q_seg, [rows_q, HEAD_DIM], [stride_qs, 1], [BLOCK_M, BLOCK_D])
        # a tile past the segment loads from row rows_q: all zeros, no memory touched
        q = q_desc.load([tl.where(m0 < len_q, m0, rows_q), 0])
    else:
        q = _load_rows(q_seg + m0.to(tl.int64) * stride_qs, stride_qs, len_q - m0, BLOCK_M, HEAD_DIM, BLOCK_D, True)

    if SINKS:
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(Sinks + head).to(tl.float32) * LOG2E
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) - float("inf")
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)

    # TMA descriptors (built on the device: segments differ per program). Measured on the H200 against plain
    # pointer loads: +2.5-5.5% at S=8k-16k, fewer registers (213 vs 255 at 128x128 tiles); NOTES_flash.md v4.
    rows_k = tl.maximum(len_k, 1)  # an empty segment never loads, but a descriptor needs a non-empty shape
    k_desc = tl.make_tensor_descriptor(k_base, [rows_k, HEAD_DIM], [stride_ks, 1], [BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(v_base, [rows_k, HEAD_DIM_V], [stride_vs, 1], [BLOCK_N, BLOCK_DV])

    seed = tl.load(Seed) if DROPOUT else 0
    bh = batch * heads_q + head
    lo, p1_end, full_lo, full_hi, hi = _kv_range(m0, len_q, len_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    if WARP_SPEC:
        # One loop over every visible tile, masked throughout: Triton 3.6's Hopper warp specialization (a producer
        # warpgroup issuing the TMA loads, two consumer warpgroups of 64 query rows each) compiles a kernel with a
        # single key loop only (several loops, an early return or an `if` in the loop make it fail or skip it).
        hi = tl.where(m0 < len_q, hi, lo)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, m0, lo, hi, len_q, len_k, window, sm_scale2,
                                   cap_scale, cap2, seed, bh, q_start, k_start, drop_p, BLOCK_M, BLOCK_N, CAUSAL,
                                   WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, MASKED=True, WARP_SPEC=True)
    else:
        # window-edge tiles, then the unmasked bulk, then the diagonal band / ragged end
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, m0, lo, p1_end, len_q, len_k, window, sm_scale2,
                                   cap_scale, cap2, seed, bh, q_start, k_start, drop_p, BLOCK_M, BLOCK_N, CAUSAL,
                                   WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, MASKED=True, WARP_SPEC=False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, m0, full_lo, full_hi, len_q, len_k, window,
                                   sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p, BLOCK_M, BLOCK_N,
                                   CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, MASKED=False, WARP_SPEC=False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_desc, v_desc, m0, full_hi, hi, len_q, len_k, window, sm_scale2,
                                   cap_scale, cap2, seed, bh, q_start, k_start, drop_p, BLOCK_M, BLOCK_N, CAUSAL,
                                   WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, MASKED=True, WARP_SPEC=False)

    # Rows with nothing visible (l = 0): out = 0, lse = 0.
    out, lse2 = finish_softmax(acc, m_i, l_i)
    if DROPOUT:  # kept probabilities scaled by 1 / (1 - p)
        out = out * drop_scale
    lse = tl.where(l_i > 0.0, lse2 * LN2, 0.0)
    o_base = Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + (q_start + m0).to(tl.int64) * stride_os
    _store_rows(o_base, stride_os, len_q - m0, out, BLOCK_M, HEAD_DIM_V, BLOCK_DV)
    rows = tl.arange(0, BLOCK_M)
    l_ptrs = Lse + batch64 * stride_lb + head.to(tl.int64) * stride_lh + q_start + m0 + rows
    tl.store(l_ptrs, lse, mask=rows < len_q - m0)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _aligned(a, b, c, ALIGN: tl.constexpr):
    """Three strides, unchanged, with their divisibility by ``ALIGN`` (16 bytes in elements) visible to the compiler.

    Triton marks an integer argument divisible only by 16: at head dims that are not multiples of 16 (72, 40, ...) a
    head stride of ``D`` elements is unmarked, so pointer loads of a row fall back to one element each (5x slower
    backward at D 72 on the H200). The host guarantees the divisibility (:func:`~hf_attn_plugin.kernels.host.tma_ready`
    inputs, our own contiguous allocations, ``D % 8 == 0``); ``(x // ALIGN) * ALIGN`` says it in a form the
    compiler's alignment analysis reads (``tl.multiple_of`` on a scalar argument does not reach it).
    """
    return (a // ALIGN) * ALIGN, (b // ALIGN) * ALIGN, (c // ALIGN) * ALIGN


@triton.jit(do_not_specialize_on_alignment=("seqlen_q", "stride_eb", "stride_eh"))
def _bwd_preprocess(Out, DO, Delta, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                    stride_eb, stride_eh, seqlen_q, heads_q,
                    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, ALIGN: tl.constexpr):
    """``Delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]`` (float32; ``d`` over the value head dim)."""
    stride_ob, stride_os, stride_oh = _aligned(stride_ob, stride_os, stride_oh, ALIGN)
    stride_db, stride_ds, stride_dh = _aligned(stride_db, stride_ds, stride_dh, ALIGN)
    m0 = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    batch = (pid_bh // heads_q).to(tl.int64)
    head = (pid_bh % heads_q).to(tl.int64)
    o = _load_rows(Out + batch * stride_ob + head * stride_oh + m0.to(tl.int64) * stride_os, stride_os,
                   seqlen_q - m0, BLOCK_M, HEAD_DIM_V, BLOCK_DV, True)
    do = _load_rows(DO + batch * stride_db + head * stride_dh + m0.to(tl.int64) * stride_ds, stride_ds,
                    seqlen_q - m0, BLOCK_M, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = tl.arange(0, BLOCK_M)
    tl.store(Delta + batch * stride_eb + head * stride_eh + m0 + rows, delta, mask=rows < seqlen_q - m0)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, m0, start, end, len_q, len_k, window,
              sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p, drop_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr):
    rows = m0 + tl.arange(0, BLOCK_M)
    pos = rows[:, None] + (len_k - len_q)  # key position of each query row (bottom-right aligned)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n_left = len_k - start_n
        k = _load_rows(k_base + start_n.to(tl.int64) * stride_ks, stride_ks, n_left, BLOCK_N, HEAD_DIM, BLOCK_D,
                       MASKED)
        v = _load_rows(v_base + start_n.to(tl.int64) * stride_vs, stride_vs, n_left, BLOCK_N, HEAD_DIM_V, BLOCK_DV,
                       MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, t = scores(qk, sm_scale2, cap_scale, cap2, SOFTCAP)
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            s = mask_scores(s, pos, cols[None, :], 0, len_k, window, CHECK_START=False, CHECK_END=True,
                            CAUSAL=CAUSAL, WINDOW=WINDOW)
        p = tl.exp2(s - lse2[:, None])  # probabilities, exactly as the forward normalised them
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:  # dL/dP through the dropped, rescaled probabilities
            keep = _dropout_keep(seed, bh, q_start + rows[:, None], k_start + start_n + tl.arange(0, BLOCK_N)[None, :],
                                 drop_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = scores_grad(p, dp, delta[:, None], t, SOFTCAP)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize_on_alignment=LENGTH_ARGS + ("stride_lb", "stride_lh"))
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Segments, Seed,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gb, stride_gs, stride_gh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_q, group, window,
    sm_scale, sm_scale2, cap_scale, cap2, drop_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SEGMENTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, ALIGN: tl.constexpr,
):
    stride_qb, stride_qs, stride_qh = _aligned(stride_qb, stride_qs, stride_qh, ALIGN)
    stride_kb, stride_ks, stride_kh = _aligned(stride_kb, stride_ks, stride_kh, ALIGN)
    stride_vb, stride_vs, stride_vh = _aligned(stride_vb, stride_vs, stride_vh, ALIGN)
    stride_db, stride_ds, stride_dh = _aligned(stride_db, stride_ds, stride_dh, ALIGN)
    stride_gb, stride_gs, stride_gh = _aligned(stride_gb, stride_gs, stride_gh, ALIGN)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, head, q_start, k_start, len_q, len_k = _segment(Segments, pid_bh, heads_q, seqlen_q, seqlen_k, SEGMENTS)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    kv_head = head // group
    batch64 = batch.to(tl.int64)
    head64 = head.to(tl.int64)
    row0 = (q_start + m0).to(tl.int64)
    q = _load_rows(Q + batch64 * stride_qb + head64 * stride_qh + row0 * stride_qs, stride_qs, len_q - m0,
                   BLOCK_M, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + batch64 * stride_db + head64 * stride_dh + row0 * stride_ds, stride_ds, len_q - m0,
                    BLOCK_M, HEAD_DIM_V, BLOCK_DV, True)
    rows = tl.arange(0, BLOCK_M)
    stat = batch64 * stride_lb + head64 * stride_lh + q_start + m0 + rows
    lse2 = tl.load(Lse + stat, mask=rows < len_q - m0, other=0.0) * LOG2E
    delta = tl.load(Delta + stat, mask=rows < len_q - m0, other=0.0)
    k_base = K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    seed = tl.load(Seed) if DROPOUT else 0
    bh = batch * heads_q + head
    lo, p1_end, full_lo, full_hi, hi = _kv_range(m0, len_q, len_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, m0, lo, p1_end, len_q, len_k,
                   window, sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p, drop_scale, HEAD_DIM,
                   BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT,
                   MASKED=True)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, m0, full_lo, full_hi, len_q, len_k,
                   window, sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p, drop_scale, HEAD_DIM,
                   BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT,
                   MASKED=False)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, m0, full_hi, hi, len_q, len_k,
                   window, sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p, drop_scale, HEAD_DIM,
                   BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT,
                   MASKED=True)
    # s = scale * q.k  =>  dq = scale * dS @ K
    dq = dq * sm_scale
    _store_rows(DQ + batch64 * stride_gb + head64 * stride_gh + row0 * stride_gs, stride_gs, len_q - m0, dq,
                BLOCK_M, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, rows, cols, off, window, sm_scale2, cap_scale, cap2,
               seed, bh, q_start, k_start, drop_p, drop_scale,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DROPOUT: tl.constexpr, MASKED: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr):
    """One query tile's contribution to dK and/or dV (``WANT_DK`` / ``WANT_DV``: a two-pass launch computes one per
    pass; the other accumulator goes through unchanged). Transposed formulation: scores are ``[BLOCK_N keys,
    BLOCK_M queries]`` so that dK and dV come out of ``dS^T @ Q`` and ``P^T @ dO`` without transposing P."""
    qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    sT, tT = scores(qkT, sm_scale2, cap_scale, cap2, SOFTCAP)
    if MASKED:  # keys past the segment need no mask: their dK/dV rows are not stored
        sT = mask_scores(sT, rows[None, :] + off, cols[:, None], 0, 0, window, CHECK_START=False, CHECK_END=False,
                         CAUSAL=CAUSAL, WINDOW=WINDOW)
    pT = tl.exp2(sT - lse2[None, :])
    if DROPOUT:  # rows / cols are local: the mask is indexed by padded-layout positions
        keepT = _dropout_keep(seed, bh, q_start + rows[None, :], k_start + cols[:, None], drop_p)
        if WANT_DV:
            dv = tl.dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WANT_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
            dsT = scores_grad(pT, dpT, delta[None, :], tT, SOFTCAP)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    else:
        if WANT_DV:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WANT_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dsT = scores_grad(pT, dpT, delta[None, :], tT, SOFTCAP)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, n0, start, end,
                len_q, len_k, window, sm_scale2, cap_scale, cap2, seed, bh, q_start, k_start, drop_p, drop_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                WANT_DK: tl.constexpr, WANT_DV: tl.constexpr):
    """Query rows past ``len_q`` load as zeros (q = dO = lse = delta = 0) and contribute exactly 0, so only the
    masked phases check bounds."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    off = len_k - len_q
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        m_left = len_q - start_m
        q = _load_rows(q_base + start_m.to(tl.int64) * stride_qs, stride_qs, m_left, BLOCK_M, HEAD_DIM, BLOCK_D,
                       MASKED)
        do = _load_rows(do_base + start_m.to(tl.int64) * stride_ds, stride_ds, m_left, BLOCK_M, HEAD_DIM_V,
                        BLOCK_DV, MASKED)
        if MASKED:
            lse2 = tl.load(lse_base + start_m + offs_m, mask=offs_m < m_left, other=0.0) * LOG2E
            delta = tl.load(delta_base + start_m + offs_m, mask=offs_m < m_left, other=0.0)
        else:
            lse2 = tl.load(lse_base + start_m + offs_m) * LOG2E
            delta = tl.load(delta_base + start_m + offs_m)
        dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, start_m + offs_m, cols, off, window, sm_scale2,
                            cap_scale, cap2, seed, bh, q_start, k_start, drop_p, drop_scale, CAUSAL, WINDOW, SOFTCAP,
                            DOT_PRECISION, DROPOUT, MASKED, WANT_DK, WANT_DV)
    return dk, dv


@triton.jit
def _dkdv_inner_ws(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, stride_lh, n0, lo, hi, group,
                   len_q, len_k, window, sm_scale2, cap_scale, cap2, seed, bh0, q_start, k_start, drop_p, drop_scale,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DROPOUT: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr):
    """Warp-specialized form: one loop over (query head of the group, query tile), masked throughout, Q/dO through
    3-D TMA descriptors ``[group, len_q, D]`` (rows past ``len_q`` load as zeros and contribute 0)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    off = len_k - len_q
    n_tiles = tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M
    for it in tl.range(0, group * n_tiles, warp_specialize=True):
        g = it // n_tiles
        start_m = lo + (it - g * n_tiles) * BLOCK_M
        q = q_desc.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_desc.load([g, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
        rows = start_m + offs_m
        stat = g.to(tl.int64) * stride_lh + rows
        lse2 = tl.load(lse_base + stat, mask=rows < len_q, other=0.0) * LOG2E
        delta = tl.load(delta_base + stat, mask=rows < len_q, other=0.0)
        dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, rows, cols, off, window, sm_scale2, cap_scale, cap2,
                            seed, bh0 + g, q_start, k_start, drop_p, drop_scale, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION,
                            DROPOUT, True, WANT_DK, WANT_DV)
    return dk, dv


@triton.jit
def _dkdv_heads(dk, dv, Q, K, V, DO, Lse, Delta, batch64, kv_head, q_start, krow0, n0, len_q, len_k,
                stride_qs, stride_qh, stride_qb, stride_ks, stride_kh, stride_kb, stride_vs, stride_vh, stride_vb,
                stride_ds, stride_dh, stride_db, stride_lb, stride_lh, group, window,
                lo, p1_end, full_lo, full_hi, hi, sm_scale2, cap_scale, cap2, seed, bh0, k_start, drop_p, drop_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, WANT_DK: tl.constexpr,
                WANT_DV: tl.constexpr):
    """Pointer-load form: K/V tile in registers, three query-tile phases per head of the group."""
    k = _load_rows(K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + krow0 * stride_ks, stride_ks,
                   len_k - n0, BLOCK_N, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + krow0 * stride_vs, stride_vs,
                   len_k - n0, BLOCK_N, HEAD_DIM_V, BLOCK_DV, True)
    # Every query head of the group reads this KV head: accumulate all of them here (no atomics).
    for g in range(0, group):
        head64 = (kv_head * group + g).to(tl.int64)
        qrow0 = q_start.to(tl.int64)
        q_base = Q + batch64 * stride_qb + head64 * stride_qh + qrow0 * stride_qs
        do_base = DO + batch64 * stride_db + head64 * stride_dh + qrow0 * stride_ds
        lse_base = Lse + batch64 * stride_lb + head64 * stride_lh + q_start
        delta_base = Delta + batch64 * stride_lb + head64 * stride_lh + q_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, n0, lo,
                             p1_end, len_q, len_k, window, sm_scale2, cap_scale, cap2, seed, bh0 + g,
                             q_start, k_start, drop_p, drop_scale, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M,
                             BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, True, WANT_DK, WANT_DV)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, n0, full_lo,
                             full_hi, len_q, len_k, window, sm_scale2, cap_scale, cap2, seed, bh0 + g,
                             q_start, k_start, drop_p, drop_scale, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M,
                             BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, False, WANT_DK, WANT_DV)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_ds, n0, full_hi,
                             hi, len_q, len_k, window, sm_scale2, cap_scale, cap2, seed, bh0 + g,
                             q_start, k_start, drop_p, drop_scale, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M,
                             BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, DROPOUT, True, WANT_DK, WANT_DV)
    return dk, dv


@triton.jit(do_not_specialize_on_alignment=LENGTH_ARGS + ("stride_lb", "stride_lh"))
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, Segments, Seed,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_gkb, stride_gks, stride_gkh,
    stride_gvb, stride_gvs, stride_gvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, heads_kv, group, window,
    sm_scale, sm_scale2, cap_scale, cap2, drop_p, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, SEGMENTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr, DROPOUT: tl.constexpr, ALIGN: tl.constexpr,
    WANT_DK: tl.constexpr = True, WANT_DV: tl.constexpr = True,
):
    stride_qb, stride_qs, stride_qh = _aligned(stride_qb, stride_qs, stride_qh, ALIGN)
    stride_kb, stride_ks, stride_kh = _aligned(stride_kb, stride_ks, stride_kh, ALIGN)
    stride_vb, stride_vs, stride_vh = _aligned(stride_vb, stride_vs, stride_vh, ALIGN)
    stride_db, stride_ds, stride_dh = _aligned(stride_db, stride_ds, stride_dh, ALIGN)
    stride_gkb, stride_gks, stride_gkh = _aligned(stride_gkb, stride_gks, stride_gkh, ALIGN)
    stride_gvb, stride_gvs, stride_gvh = _aligned(stride_gvb, stride_gvs, stride_gvh, ALIGN)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch, kv_head, q_start, k_start, len_q, len_k = _segment(Segments, pid_bh, heads_kv, seqlen_q, seqlen_k,
                                                              SEGMENTS)
    n0 = pid_n * BLOCK_N
    if not WARP_SPEC:  # (no early return under Triton's warp specialization: the loop below is empty instead)
        if n0 >= len_k:
            return
    batch64 = batch.to(tl.int64)
    krow0 = (k_start + n0).to(tl.int64)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    lo, p1_end, full_lo, full_hi, hi = _q_range(n0, len_q, len_k, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    seed = tl.load(Seed) if DROPOUT else 0
    bh0 = (batch * heads_kv + kv_head) * group  # batch * heads_q + the group's first query head
    if WARP_SPEC:
        # every load through TMA (the producer warps issue them); a tile past the segment loads zeros
        k_seg = K + batch64 * stride_kb + kv_head.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
        v_seg = V + batch64 * stride_vb + kv_head.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
        rows_k = tl.maximum(len_k, 1)
        k = tl.make_tensor_descriptor(k_seg, [rows_k, HEAD_DIM], [stride_ks, 1], [BLOCK_N, BLOCK_D]).load(
            [tl.where(n0 < len_k, n0, rows_k), 0])
        v = tl.make_tensor_descriptor(v_seg, [rows_k, HEAD_DIM_V], [stride_vs, 1], [BLOCK_N, BLOCK_DV]).load(
            [tl.where(n0 < len_k, n0, rows_k), 0])
        head0 = (kv_head * group).to(tl.int64)
        qrow0 = q_start.to(tl.int64)
        rows_q = tl.maximum(len_q, 1)
        q_desc = tl.make_tensor_descriptor(Q + batch64 * stride_qb + head0 * stride_qh + qrow0 * stride_qs,
                                           [group, rows_q, HEAD_DIM], [stride_qh, stride_qs, 1], [1, BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DO + batch64 * stride_db + head0 * stride_dh + qrow0 * stride_ds,
                                            [group, rows_q, HEAD_DIM_V], [stride_dh, stride_ds, 1],
                                            [1, BLOCK_M, BLOCK_DV])
        hi = tl.where(n0 < len_k, hi, lo)
        dk, dv = _dkdv_inner_ws(dk, dv, k, v, q_desc, do_desc, Lse + batch64 * stride_lb + head0 * stride_lh + q_start,
                                Delta + batch64 * stride_lb + head0 * stride_lh + q_start, stride_lh, n0, lo, hi, group,
                                len_q, len_k, window, sm_scale2, cap_scale, cap2, seed, bh0, q_start, k_start, drop_p,
                                drop_scale, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION,
                                DROPOUT, WANT_DK, WANT_DV)
    else:
        dk, dv = _dkdv_heads(dk, dv, Q, K, V, DO, Lse, Delta, batch64, kv_head, q_start, krow0, n0, len_q, len_k,
                             stride_qs, stride_qh, stride_qb, stride_ks, stride_kh, stride_kb, stride_vs, stride_vh,
                             stride_vb, stride_ds, stride_dh, stride_db, stride_lb, stride_lh, group, window,
                             lo, p1_end, full_lo, full_hi, hi, sm_scale2, cap_scale, cap2, seed, bh0, k_start, drop_p,
                             drop_scale, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_M, BLOCK_N, CAUSAL, WINDOW,
                             SOFTCAP, DOT_PRECISION, DROPOUT, WANT_DK, WANT_DV)
    if WANT_DK:
        dk = dk * sm_scale
        _store_rows(DK + batch64 * stride_gkb + kv_head.to(tl.int64) * stride_gkh + krow0 * stride_gks, stride_gks,
                    len_k - n0, dk, BLOCK_N, HEAD_DIM, BLOCK_D)
    if WANT_DV:
        _store_rows(DV + batch64 * stride_gvb + kv_head.to(tl.int64) * stride_gvh + krow0 * stride_gvs, stride_gvs,
                    len_k - n0, dv, BLOCK_N, HEAD_DIM_V, BLOCK_DV)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for the TMA descriptors our kernels build on the device (one small buffer per launch)."""
    device = "cpu" if configs.interpreting() or not torch.cuda.is_available() else "cuda"
    return torch.empty(size, dtype=torch.int8, device=device)


def _ensure_scratch_allocator() -> None:
    """Give Triton an allocator for device-side descriptors unless the caller's context already has one.

    Triton keeps the allocator in a ContextVar (per thread): checked at every launch, since transformers'
    continuous batching runs the model in its own thread.
    """
    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def check_head_dim(head_dim: int, kernels: str = "flash", name: str = "head_dim") -> None:
    """Raise a ValueError naming the supported set unless the Triton kernels can run ``head_dim`` (``name``: what
    the message calls it, e.g. the value head dim)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{name} {head_dim} is not supported by the Triton {kernels} kernels: they support every multiple of "
            f"{HEAD_DIM_MULTIPLE} from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}. Use attn_implementation='sdpa' or 'eager' "
            f"for this model, or HF_ATTN_PLUGIN_BACKEND=reference (plain PyTorch)."
        )


def _check(q: torch.Tensor, v: torch.Tensor) -> None:
    """What the kernels can run (the inputs themselves are checked by :func:`hf_attn_plugin.ops.attention`)."""
    check_head_dim(q.shape[-1])
    check_head_dim(v.shape[-1], name="value head_dim")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash kernels support float16, bfloat16 and float32, got {q.dtype}")


def _alloc(shape, like: torch.Tensor, dtype, zero: bool) -> torch.Tensor:
    """Zeros where the kernel leaves rows unwritten (segments); else uninitialised (NaN under POISON)."""
    if zero:
        return torch.zeros(shape, dtype=dtype, device=like.device)
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# The backward's lse and delta: [B, Hq, Sq] views of [B, Hq, round_up(Sq, 4)] float32 buffers. The Gluon dK/dV kernel
# reads them through TMA descriptors, whose row strides must be multiples of 16 bytes; the Triton kernels take the
# strides from the tensors. No kernel reads the pad (uninitialised; the tests fill it with NaN). Padding here rather
# than in the forward keeps the lse users see (and ops' fake kernel declares) contiguous; it costs one small copy of
# lse when Sq % 4 != 0 (8 bytes per query row and head, against the backward's O(Sq * Sk * D) work).
STATS_ROW_MULTIPLE = 4


def stats_buffer(batch: int, heads: int, seqlen: int, device) -> torch.Tensor:
    """An uninitialised float32 ``[batch, heads, seqlen]`` tensor in the backward's stats layout."""
    padded = cdiv(seqlen, STATS_ROW_MULTIPLE) * STATS_ROW_MULTIPLE
    return torch.empty((batch, heads, padded), dtype=torch.float32, device=device)[..., :seqlen]


def padded_stats(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32 ``[B, H, S]``: lse, delta) if it has the stats layout (:func:`stats_buffer`, 16-byte aligned),
    else a copy that has: a copy exactly when ``S % 4 != 0`` for the forward's contiguous lse."""
    batch, heads, seqlen = t.shape
    padded = cdiv(seqlen, STATS_ROW_MULTIPLE) * STATS_ROW_MULTIPLE
    if t.stride() == (heads * padded, padded, 1) and t.data_ptr() % 16 == 0:
        return t
    return stats_buffer(batch, heads, seqlen, t.device).copy_(t)


class _Launch:
    """Everything both directions derive from the shapes and the params (grid extents, flags, scales)."""

    def __init__(self, q, k, v, params: AttentionParams):
        self.batch, self.seqlen_q, self.heads_q, self.head_dim = q.shape
        self.seqlen_k, self.heads_kv, self.head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
        self.group = self.heads_q // self.heads_kv
        self.block_d = max(next_power_of_2(self.head_dim), 16)
        self.block_dv = max(next_power_of_2(self.head_dim_v), 16)
        # Launch configs are picked by the wider of the two: every kernel holds tiles of both widths (forward: Q, K
        # [., D] and V, the accumulator [., Dv]; dQ: Q, K, dQ and dO, V; dK/dV: K, Q, dK and V, dO, dV), and the
        # configs of a bucket are sized for tiles of its width everywhere, so they fit (shared memory, registers)
        # whichever of D and Dv is the smaller. Dv == D: the bucket of D, as before.
        self.config_d = max(self.block_d, self.block_dv)
        self.segmented = params.segments is not None
        if self.segmented:
            self.segments = params.segments.to(device=q.device, dtype=torch.int32).contiguous()
            self.n_seg = self.segments.shape[0]
            max_q, max_k = params.max_seqlens(self.seqlen_q, self.seqlen_k)
            self.max_q = max(min(max_q, self.seqlen_q), 1)
            self.max_k = max(min(max_k, self.seqlen_k), 1)
        else:
            self.segments = q  # dummy pointer, never read
            self.n_seg = self.batch
            self.max_q, self.max_k = self.seqlen_q, self.seqlen_k
        self.causal, self.window, self.softcap, self.scale = params.causal, params.window, params.softcap, params.scale
        self.sm_scale2, self.cap_scale, self.cap2 = score_scales(self.scale, self.softcap)
        self.dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
        self.empty = self.n_seg == 0 or self.seqlen_q == 0
        self.dropout_p = params.dropout_p
        self.dropout = self.dropout_p > 0.0
        if self.dropout:
            seed = params.seed
            if seed is None or seed.dtype != torch.int64 or seed.numel() < 1:
                raise ValueError("dropout needs params.seed: an int64 tensor on the inputs' device (from "
                                 "ops.dropout_seed)")
            self.seed = seed.to(q.device)
        else:
            self.seed = q  # dummy pointer, never read
        self.drop_scale = 1.0 / (1.0 - self.dropout_p) if self.dropout else 1.0

    def flags(self):
        return dict(
            HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, HEAD_DIM_V=self.head_dim_v, BLOCK_DV=self.block_dv,
            CAUSAL=self.causal, WINDOW=self.window > 0, SOFTCAP=self.softcap > 0, SEGMENTS=self.segmented,
            DOT_PRECISION=self.dot_precision, DROPOUT=self.dropout,
        )

    def key(self, dtype, sinks=False):
        """What :func:`configs.pick` chooses a launch config by (raw values: configs buckets them)."""
        return dict(dtype=dtype, causal=self.causal, window=self.window > 0, softcap=self.softcap > 0,
                    segmented=self.segmented, seq_q=self.max_q, seq_k=self.max_k, group=self.group, sinks=sinks,
                    dropout=self.dropout)


def flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams):
    """Returns ``(out [B, Sq, Hq, Dv] in q.dtype, lse [B, Hq, Sq] float32, natural log)`` (``Dv``: v's head dim).

    ``params.dropout_p > 0``: attention dropout with the mask :func:`dropout_mask` gives for ``params.seed`` (an
    int64 tensor on the device, from :func:`hf_attn_plugin.ops.dropout_seed`); the backward must get the same seed.

    Kernel: the launch config :func:`configs.pick` gives for the call's key; a config with ``gluon`` >= 0 runs that
    variant of the Gluon Hopper forward (``gluon_fwd.py``) where it supports the call, else the key's best Triton
    config (``pick(..., triton_only=True)``). Both give the same contract (lse natural log), so the backward does
    not depend on which ran (its dK/dV pass makes the same choice between Triton and ``gluon_bwd.py``)."""
    _check(q, v)
    q, k, v = _unit_last(q), tma_ready(k), tma_ready(v)
    L = _Launch(q, k, v, params)
    sinks = params.sinks
    buffers = []  # out, lse of the Triton kernel (the Gluon one allocates its own)

    def outputs():
        if not buffers:
            buffers.append(_alloc((*q.shape[:3], L.head_dim_v), q, q.dtype, zero=L.segmented))
            buffers.append(_alloc((L.batch, L.heads_q, L.seqlen_q), q, torch.float32, zero=L.segmented))
        return buffers

    if L.empty:
        out, lse = outputs()
        return out.zero_(), lse.zero_()
    sinks_arg = sinks.to(device=q.device, dtype=torch.float32).contiguous() if sinks is not None else q
    _ensure_scratch_allocator()
    gluon_unsupported = _gluon_check(q, k, v, params)

    def launch(cfg: configs.Config):
        if cfg.gluon >= 0:  # a Gluon forward variant (kernels/gluon_fwd.py): returns its own (out, lse)
            reason = gluon_unsupported()
            if reason is not None:
                raise configs.Unsupported(reason)
            from . import gluon_fwd

            return gluon_fwd.gluon_attn_forward(q, k, v, params, warp_spec=cfg.gluon)
        out, lse = outputs()
        grid = (cdiv(L.max_q, cfg.block_m), L.n_seg * L.heads_q)
        kernel = relauncher(_attn_fwd, dict(
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINKS=sinks is not None, WARP_SPEC=cfg.warp_spec, **L.flags(),
        ), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return kernel.launch(grid, (
            q, k, v, out, lse, L.segments, sinks_arg, L.seed,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *out.stride()[:3],
            *lse.stride()[:2],
            L.seqlen_q, L.seqlen_k, L.heads_q, L.group, L.window,
            L.sm_scale2, L.cap_scale, L.cap2, L.dropout_p, L.drop_scale,
        ))

    key = L.key(q.dtype, sinks is not None)
    cfg = configs.pick("fwd", L.config_d, key, launch)
    triton_only = False
    if cfg.gluon >= 0:
        if gluon_unsupported() is None:
            return launch(cfg)
        # The key's entry names a Gluon kernel that cannot run this call: the key's best Triton config instead.
        triton_only = True
        cfg = configs.pick("fwd", L.config_d, key, launch, triton_only=True)
    configs.launch_fitting("fwd", L.config_d, key, cfg, launch, triton_only=triton_only)
    out, lse = outputs()
    return out, lse


def _gluon_check(q, k, v, params: AttentionParams, backward: bool = False):
    """:func:`_gluon_unsupported` for one call, computed at most once (the config pick and the launch both ask)."""
    memo = []

    def reason() -> Optional[str]:
        if not memo:
            memo.append(_gluon_unsupported(q, k, v, params, backward))
        return memo[0]

    return reason


def _gluon_unsupported(q, k, v, params: AttentionParams, backward: bool = False) -> Optional[str]:
    """Why the Gluon forward (``backward``: the Gluon dK/dV kernel) cannot run this call (None: it can). Gluon is
    imported only for compiled CUDA calls: never under the interpreter or for CPU tensors."""
    kernel = "Gluon dK/dV kernel" if backward else "Gluon forward"
    if v.shape[-1] != q.shape[-1]:  # (its tiles and descriptors have one head dim)
        return f"the {kernel} has one head dim for q, k and v (this call: {q.shape[-1]}, value {v.shape[-1]})"
    if configs.interpreting() or not q.is_cuda:
        return f"the {kernel} runs compiled on CUDA only"
    if not configs.gluon_enabled():
        return f"the {kernel} is switched off (HF_ATTN_PLUGIN_GLUON=0)"
    if backward:
        from . import gluon_bwd

        return gluon_bwd.unsupported_reason(q, k, v, params)
    from . import gluon_fwd

    return gluon_fwd.unsupported_reason(q, k, v, params)


def flash_attn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    params: AttentionParams,
):
    """Returns ``(dq, dk, dv, dsinks)`` with ``dsinks`` float32 ``[Hq]`` (or None without sinks). ``out`` is the
    forward's (dropped) output; ``params`` those of the forward (with its seed: the dropout mask is regenerated).

    dK/dV: the launch config's kernel: Triton, or with ``gluon`` >= 0 the Gluon Hopper kernel (``gluon_bwd.py``)
    where it supports the call, else the key's best Triton config (as the forward). dQ: always Triton."""
    _check(q, v)
    # every tensor the kernels read or write has 16-byte aligned strides (their ALIGN hint; TMA needs it too)
    q, k, v, out = tma_ready(q), tma_ready(k), tma_ready(v), tma_ready(out)
    dout = tma_ready(dout.contiguous())  # a grad of sum() has stride 0
    align = 16 // q.element_size()
    _ensure_scratch_allocator()  # autograd runs the backward in its own thread (Triton's allocator is per thread)
    lse = padded_stats(lse)  # (lse and delta share the stats layout: the Triton kernels read both with lse's strides)
    L = _Launch(q, k, v, params)
    sinks = params.sinks
    # dq for rows outside every segment and dk/dv for keys outside every segment are never written. Contiguous,
    # whatever the inputs' layout: what the op returns (a transposed q would otherwise cost a copy of dq).
    dq = _alloc(q.shape, q, q.dtype, zero=L.segmented)
    dk = _alloc(k.shape, k, k.dtype, zero=L.segmented)
    dv = _alloc(v.shape, v, v.dtype, zero=L.segmented)
    if L.empty or L.seqlen_k == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        dsinks = torch.zeros(L.heads_q, dtype=torch.float32, device=q.device) if sinks is not None else None
        return dq, dk, dv, dsinks

    # delta = rowsum(dO * O); rows outside every segment have O = 0, hence delta = 0.
    delta = stats_buffer(L.batch, L.heads_q, L.seqlen_q, q.device)
    pre = configs.candidates("bwd_pre", L.block_dv)[0]  # its tiles are [BLOCK_M, Dv] (O and dO) only
    relauncher(_bwd_preprocess, dict(HEAD_DIM_V=L.head_dim_v, BLOCK_DV=L.block_dv, BLOCK_M=pre.block_m, ALIGN=align),
               num_warps=pre.num_warps).launch((cdiv(L.seqlen_q, pre.block_m), L.batch * L.heads_q), (
        out, dout, delta,
        *out.stride()[:3],
        *dout.stride()[:3],
        *delta.stride()[:2], L.seqlen_q, L.heads_q,
    ))
    # scalar arguments of both kernels, by keyword (each launch adds its own head count)
    common = dict(seqlen_q=L.seqlen_q, seqlen_k=L.seqlen_k, group=L.group, window=L.window, sm_scale=L.scale,
                  sm_scale2=L.sm_scale2, cap_scale=L.cap_scale, cap2=L.cap2, drop_p=L.dropout_p,
                  drop_scale=L.drop_scale)

    def launch_dq(cfg: configs.Config):
        grid = (cdiv(L.max_q, cfg.block_m), L.n_seg * L.heads_q)
        kernel = relauncher(_attn_bwd_dq, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ALIGN=align, **L.flags()),
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return kernel.launch(grid, (
            q, k, v, dout, lse, delta, dq, L.segments, L.seed,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            *dout.stride()[:3],
            *dq.stride()[:3],
            *lse.stride()[:2],
        ), heads_q=L.heads_q, **common)

    gluon_unsupported = _gluon_check(q, k, v, params, backward=True)

    def launch_dkdv(cfg: configs.Config):
        if cfg.gluon >= 0:  # the Gluon Hopper dK/dV kernel (kernels/gluon_bwd.py)
            reason = gluon_unsupported()
            if reason is not None:
                raise configs.Unsupported(reason)
            from . import gluon_bwd

            return gluon_bwd.gluon_attn_backward_dkdv(dout, q, k, v, lse, delta, dk, dv, params, warp_spec=cfg.gluon)
        grid = (cdiv(L.max_k, cfg.block_n), L.n_seg * L.heads_kv)
        # one launch for both, or (two_pass) dV then dK, each with a single accumulator
        for want_dk, want_dv in ((False, True), (True, False)) if cfg.two_pass else ((True, True),):
            kernel = relauncher(_attn_bwd_dkdv, dict(
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WARP_SPEC=cfg.warp_spec, ALIGN=align, WANT_DK=want_dk,
                WANT_DV=want_dv, **L.flags(),
            ), num_warps=cfg.num_warps, num_stages=cfg.num_stages).launch(grid, (
                q, k, v, dout, lse, delta, dk, dv, L.segments, L.seed,
                *q.stride()[:3],
                *k.stride()[:3],
                *v.stride()[:3],
                *dout.stride()[:3],
                *dk.stride()[:3],
                *dv.stride()[:3],
                *lse.stride()[:2],
            ), heads_kv=L.heads_kv, **common)
        return kernel

    key = L.key(q.dtype)
    cfg = configs.pick("bwd_dkdv", L.config_d, key, launch_dkdv)
    triton_only = cfg.gluon >= 0 and gluon_unsupported() is not None
    if triton_only:  # the key's entry names the Gluon dK/dV kernel, which cannot run this call: best Triton config
        cfg = configs.pick("bwd_dkdv", L.config_d, key, launch_dkdv, triton_only=True)
    configs.launch_fitting("bwd_dkdv", L.config_d, key, cfg, launch_dkdv, triton_only=triton_only)
    configs.launch_fitting("bwd_dq", L.config_d, key, configs.pick("bwd_dq", L.config_d, key, launch_dq), launch_dq)

    dsinks = None
    if sinks is not None:
        # d lse_i / d sink = exp(sink - lse_i) and d out_i / d lse_i = -out_i, so
        # dsink = -sum_i exp(sink - lse_i) * rowsum(dO_i * O_i). Rows outside segments: delta = 0.
        prob_sink = torch.exp(sinks.to(device=q.device, dtype=torch.float32).view(1, -1, 1) - lse)
        dsinks = -(prob_sink * delta).sum(dim=(0, 2))
    return dq, dk, dv, dsinks


def dropout_mask(seed: torch.Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int, dropout_p: float
                 ) -> torch.Tensor:
    """The kernels' dropout mask for ``seed`` as a bool tensor ``[B, Hq, Sq, Sk]`` (True = kept), indexed by
    positions in the padded layout (segments select parts of it). For tests and debugging: it materialises the
    whole mask."""
    keep = torch.empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.int8, device=seed.device)
    if keep.numel():
        grid = (cdiv(seqlen_q, 32), cdiv(seqlen_k, 32), batch * heads_q)
        _dropout_mask_kernel[grid](seed, keep, seqlen_q, seqlen_k, float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return keep.bool()
