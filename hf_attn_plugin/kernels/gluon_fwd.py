"""Experimental FlashAttention-3-style forward for Hopper (sm_90), written in Gluon (Triton 3.6).

Status: a per-key choice of the launch-config system: a forward config with ``gluon`` 0..3 (kernels/configs.py)
names a variant, and :func:`hf_attn_plugin.kernels.flash.flash_attn_forward` runs it where
:func:`unsupported_reason` allows, else the Triton forward (see benchmarks/NOTES_gluon.md). Supports the subset the
fast path needs: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` in bf16/fp16, GQA (kv head = q head // group),
causal (bottom-right aligned, as in reference.py) or not, D in {64, 128}. Anything else raises
``NotImplementedError`` so a caller can fall back to :func:`hf_attn_plugin.kernels.flash.flash_attn_forward`.

Kernel structure (one CTA = one ``BLOCK_M``-row query tile of one head):

* Q, K, V and O move through TMA with 4-D descriptors over ``[B, S, H, D]`` (block ``[1, rows, 1, D]``), so rows
  past the sequence end read as zeros and are clipped on store, per batch and head.
* K/V tiles go through a ``NUM_STAGES`` ring of shared-memory buffers, each with an mbarrier that the TMA
  completes ("ready"); a stage is refilled once the P@V matmul that read it has finished.
* Who does what (``warp_spec``): 0: 8 math warps (two warpgroups, 64 rows each) also issue the loads; 1: plus
  a 1-warp TMA producer partition (``gl.warp_specialize``, 24 registers, math warps 240); 2: the two math
  warpgroups become separate partitions with their own Q/O tiles (FA3's layout); 3: as 2, plus FA3's
  ping-pong (the warpgroups take turns issuing their GEMMs).
* ``S = Q K^T`` and ``O += P V`` are async wgmma (``warpgroup_mma``), P stays in registers (A operand).
* FA3's intra-warpgroup overlap: the next tile's ``Q K^T`` and this tile's ``P V`` are in flight while the
  softmax of the next tile runs (``warpgroup_mma_wait(1)`` waits only for ``Q K^T``).
* Softmax in base 2 with ``scale * log2(e)`` folded in; causal masks only the diagonal / ragged tiles (a second
  loop), and skips tiles above the diagonal.
"""

from __future__ import annotations

from typing import Optional

import torch

from .host import cdiv, tma_ready
from .params import AttentionParams
from .primitives import LENGTH_ARGS

from .gluon_api import (IMPORT_ERROR, LOG2E, fence_async_shared, gl, gluon, is_hopper, mbarrier,
                        rows_descriptor, tma, warpgroup_mma, warpgroup_mma_wait)
SUPPORTED_HEAD_DIMS = (64, 128)
POISON = False  # tests: allocate out/lse as NaN, to prove the kernel writes every element (as flash.POISON)


def _config(head_dim: int, warp_spec: int = 0) -> dict:
    """Tile sizes: 128 query rows (two warpgroups, 64 rows each), 128 key rows; 2 stages at D128, 3 at D64.
    ``num_warps`` is the default partition's: both math warpgroups, or (warp_spec >= 2) only the first."""
    return dict(BLOCK_M=128, BLOCK_N=128, NUM_STAGES=2 if head_dim == 128 else 3,
                num_warps=4 if warp_spec >= 2 else 8)


if gluon is not None:

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, rows, n0, seqlen_k, off, qk_scale,
                      MASK: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Online softmax of one score tile (base 2). Returns ``(p, alpha, m_new, l_new)``; ``alpha`` rescales O."""
        s = s * qk_scale
        if MASK:
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            keep = gl.expand_dims(cols < seqlen_k, 0)
            if CAUSAL:
                keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + off, 1))
            s = gl.where(keep, s, -float("inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_use = gl.where(m_new == -float("inf"), 0.0, m_new)  # rows that see no key yet: keep exp2 finite
        p = gl.exp2(s - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _kv_step(j, q_tile, k_bufs, v_bufs, ready, empty, turn, k_desc, v_desc, p, o, m_i, l_i, rows, b, kv_head,
                 n_tiles, seqlen_k, off, qk_scale,
                 MASK: gl.constexpr, CAUSAL: gl.constexpr, WARP_SPEC: gl.constexpr, WG: gl.constexpr,
                 BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, s_layout: gl.constexpr,
                 o_layout: gl.constexpr, p_layout: gl.constexpr):
        """One FA3 step: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}, softmax S_j while P V runs, then hand
        stage j-1 back (to the producer warp with WARP_SPEC, else refill it here).

        WARP_SPEC 3 (ping-pong): warpgroup WG issues its two GEMMs only on its turn, then hands the turn to the
        other warpgroup, so one warpgroup's softmax runs under the other's GEMMs."""
        stage = j % NUM_STAGES
        mbarrier.wait(ready.index(stage), (j // NUM_STAGES) & 1)
        if WARP_SPEC == 3:
            mbarrier.wait(turn.index(WG), (j - 1) & 1)
        k_tile = k_bufs.index(stage).reshape([BLOCK_N, HEAD_DIM])
        s_tok = warpgroup_mma(q_tile, k_tile.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        prev = (j - 1) % NUM_STAGES
        v_tile = v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM])
        o_tok = warpgroup_mma(p, v_tile, o, is_async=True)
        if WARP_SPEC == 3:
            mbarrier.arrive(turn.index(1 - WG))
        s = warpgroup_mma_wait(1, deps=[s_tok])  # wgmma groups retire in order: Q K^T is done, P V may run on
        p_new, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, rows, j * BLOCK_N, seqlen_k, off, qk_scale,
                                               MASK, CAUSAL, BLOCK_N, s_layout)
        o, _ = warpgroup_mma_wait(0, deps=[o_tok, p])
        # Both warpgroups must be done with stage `prev` before it is refilled (a wait covers only the issuing
        # warpgroup's wgmma).
        gl.thread_barrier()
        if WARP_SPEC:
            mbarrier.arrive(empty.index(prev))
        else:
            _load_kv(k_desc, v_desc, k_bufs, v_bufs, ready, b, kv_head, j - 1 + NUM_STAGES, prev, n_tiles, BLOCK_N)
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout), assert_trivial=True), 1)
        p = gl.convert_layout(p_new.to(q_tile.dtype), p_layout, assert_trivial=True)
        return p, o, m_i, l_i

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_bufs, v_bufs, ready, b, kv_head, tile, stage, n_tiles, BLOCK_N: gl.constexpr):
        """TMA K and V tile ``tile`` into ``stage`` (nothing if ``tile >= n_tiles``)."""
        pred = tile < n_tiles
        mbarrier.expect(ready.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [b, tile * BLOCK_N, kv_head, 0], ready.index(stage),
                                        k_bufs.index(stage), pred=pred)
        tma.async_copy_global_to_shared(v_desc, [b, tile * BLOCK_N, kv_head, 0], ready.index(stage),
                                        v_bufs.index(stage), pred=pred)

    @gluon.jit
    def _producer(k_desc, v_desc, k_bufs, v_bufs, ready, empty, b, kv_head, n_tiles,
                  BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
        """WARP_SPEC worker (1 warp): keep the K/V ring full; stage s is reused once the consumers arrive on
        ``empty[s]``."""
        for j in range(n_tiles):
            stage = j % NUM_STAGES
            mbarrier.wait(empty.index(stage), ((j // NUM_STAGES) & 1) ^ 1, pred=j >= NUM_STAGES)
            _load_kv(k_desc, v_desc, k_bufs, v_bufs, ready, b, kv_head, j, stage, n_tiles, BLOCK_N)

    @gluon.jit
    def _consumer(q_desc, k_desc, v_desc, o_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, lse_ptr,
                  lse_stride_b, lse_stride_h, b, h, kv_head, m0, n_tiles, n_full, seqlen_q, seqlen_k, off, qk_scale,
                  CAUSAL: gl.constexpr, WARP_SPEC: gl.constexpr, WG: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Math warps for ``BLOCK_M`` query rows from ``m0`` (both warpgroups, or with WARP_SPEC >= 2 warpgroup
        ``WG`` alone): all matmuls, the softmax and the epilogue (lse store, O through ``q_smem`` and TMA)."""
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

        rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
        m_i = gl.full([BLOCK_M], -float("inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])

        # Peeled tile 0: S_0 and its softmax (always masked: cheap, once).
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(ready.index(0), 0)
        s_tok = warpgroup_mma(q_tile, k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        p0, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, rows, 0, seqlen_k, off, qk_scale,
                                            True, CAUSAL, BLOCK_N, s_layout)
        p = gl.convert_layout(p0.to(dtype), p_layout, assert_trivial=True)

        # Unmasked tiles, then the diagonal / ragged ones.
        for j in range(1, gl.maximum(n_full, 1)):
            p, o, m_i, l_i = _kv_step(j, q_tile, k_bufs, v_bufs, ready, empty, turn, k_desc, v_desc, p, o, m_i, l_i,
                                      rows, b, kv_head, n_tiles, seqlen_k, off, qk_scale, False, CAUSAL, WARP_SPEC,
                                      WG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, s_layout, o_layout, p_layout)
        for j in range(gl.maximum(n_full, 1), n_tiles):
            p, o, m_i, l_i = _kv_step(j, q_tile, k_bufs, v_bufs, ready, empty, turn, k_desc, v_desc, p, o, m_i, l_i,
                                      rows, b, kv_head, n_tiles, seqlen_k, off, qk_scale, True, CAUSAL, WARP_SPEC,
                                      WG, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, s_layout, o_layout, p_layout)

        # Last P V.
        last = (n_tiles - 1) % NUM_STAGES
        o_tok = warpgroup_mma(p, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        o, _ = warpgroup_mma_wait(0, deps=[o_tok, p])

        # Epilogue: rows that saw no key get out = 0, lse = 0 (as reference.py).
        live = l_i > 0.0
        l_safe = gl.where(live, l_i, 1.0)
        inv_l = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout), assert_trivial=True)
        o = o * gl.expand_dims(inv_l, 1)
        lse = gl.where(live, (m_i + gl.log2(l_safe)) * 0.6931471805599453, 0.0)
        lse_ptrs = lse_ptr + b * lse_stride_b + h * lse_stride_h + rows
        gl.store(lse_ptrs, lse, mask=rows < seqlen_q)

        q_tile.store(o.to(dtype))  # Q is dead: reuse its buffer for O
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, m0, h, 0], q_smem)
        tma.store_wait(0)

    @gluon.jit(do_not_specialize_on_alignment=LENGTH_ARGS + ("lse_stride_b", "lse_stride_h"))
    def _attn_fwd_gluon(q_desc, k_desc, v_desc, o_desc, lse_ptr, lse_stride_b, lse_stride_h,
                        seqlen_q, seqlen_k, heads_q, group, qk_scale,
                        CAUSAL: gl.constexpr, WARP_SPEC: gl.constexpr, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
        num_warps: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = q_desc.dtype
        # Longest causal tiles first: reverse the query-tile order.
        pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // heads_q
        h = bh % heads_q
        kv_head = h // group
        m0 = pid_m * BLOCK_M
        off = seqlen_k - seqlen_q  # bottom-right causal alignment

        hi = seqlen_k
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        if CAUSAL:
            hi = gl.minimum(hi, m0 + BLOCK_M + off)
            full_hi = gl.minimum(full_hi, gl.maximum(m0 + off + 1, 0) // BLOCK_N * BLOCK_N)
        n_tiles = gl.maximum(gl.cdiv(gl.maximum(hi, 0), BLOCK_N), 1)  # >= 1: fully masked rows still get written
        n_full = gl.minimum(full_hi // BLOCK_N, n_tiles)

        # WARP_SPEC 2, 3: two consumer partitions of one warpgroup each, each with its own Q/O tile of
        # SUB_M = BLOCK_M / 2 rows (the host made the Q/O descriptors SUB_M rows tall).
        CONSUMERS: gl.constexpr = 2 if WARP_SPEC >= 2 else 1
        SUB_M: gl.constexpr = BLOCK_M // CONSUMERS
        q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # WARP_SPEC 3: ping-pong
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)  # every consumer partition releases every stage
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()
        if WARP_SPEC == 3:
            mbarrier.arrive(turn.index(0))  # warpgroup 0 has the first turn

        for i in gl.static_range(CONSUMERS):
            mbarrier.expect(q_bars.index(i), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, m0 + i * SUB_M, h, 0], q_bars.index(i), q_bufs.index(i))
        # (Partition argument tuples are written inline: a tuple built beforehand turns constexprs into tensors.)
        if WARP_SPEC >= 2:  # FA3 layout: two 4-warp consumers (240 registers each) + a 1-warp producer (24)
            gl.warp_specialize([(_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs.index(0), k_bufs, v_bufs,
                                             q_bars.index(0), ready, empty, turn, lse_ptr, lse_stride_b, lse_stride_h,
                                             b, h, kv_head, m0, n_tiles, n_full, seqlen_q, seqlen_k, off, qk_scale,
                                             CAUSAL, WARP_SPEC, 0, SUB_M, BLOCK_N, HEAD_DIM, NUM_STAGES, num_warps)),
                                (_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs.index(1), k_bufs, v_bufs,
                                             q_bars.index(1), ready, empty, turn, lse_ptr, lse_stride_b, lse_stride_h,
                                             b, h, kv_head, m0 + SUB_M, n_tiles, n_full, seqlen_q, seqlen_k, off,
                                             qk_scale, CAUSAL, WARP_SPEC, 1, SUB_M, BLOCK_N, HEAD_DIM, NUM_STAGES,
                                             num_warps)),
                                (_producer, (k_desc, v_desc, k_bufs, v_bufs, ready, empty, b, kv_head, n_tiles,
                                             BLOCK_N, NUM_STAGES))],
                               [num_warps, 1], [240, 24])
        elif WARP_SPEC == 1:  # a 1-warp TMA producer (24 registers) beside the math warps
            gl.warp_specialize([(_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs.index(0), k_bufs, v_bufs,
                                             q_bars.index(0), ready, empty, turn, lse_ptr, lse_stride_b, lse_stride_h,
                                             b, h, kv_head, m0, n_tiles, n_full, seqlen_q, seqlen_k, off, qk_scale,
                                             CAUSAL, WARP_SPEC, 0, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES,
                                             num_warps)),
                                (_producer, (k_desc, v_desc, k_bufs, v_bufs, ready, empty, b, kv_head, n_tiles,
                                             BLOCK_N, NUM_STAGES))],
                               [1], [24])
        else:  # the math warps fill the ring themselves
            for i in gl.static_range(NUM_STAGES):
                _load_kv(k_desc, v_desc, k_bufs, v_bufs, ready, b, kv_head, i, i, n_tiles, BLOCK_N)
            _consumer(q_desc, k_desc, v_desc, o_desc, q_bufs.index(0), k_bufs, v_bufs, q_bars.index(0), ready, empty,
                      turn, lse_ptr, lse_stride_b, lse_stride_h, b, h, kv_head, m0, n_tiles, n_full, seqlen_q,
                      seqlen_k, off, qk_scale, CAUSAL, WARP_SPEC, 0, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, num_warps)

        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(turn.index(i))
        for i in gl.static_range(CONSUMERS):
            mbarrier.invalidate(q_bars.index(i))


def unsupported_reason(q, k, v, params: Optional[AttentionParams] = None) -> Optional[str]:
    """Why this kernel cannot run the call (``None``: it can). ``params`` ``None``: a call without optional features."""
    if IMPORT_ERROR is not None:
        return f"Gluon is not available in this Triton ({IMPORT_ERROR!r}); Triton 3.6 is needed"
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "the Gluon forward runs on CUDA tensors only (got device %s); use flash.flash_attn_forward" % q.device
    hopper, capability = is_hopper(q.device)
    if not hopper:
        return "the Gluon forward is written for Hopper (sm_90); this GPU is sm_%d%d" % capability
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be [B, S, H, D]"
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"the Gluon forward needs bf16/fp16 q, k, v of one dtype (got {q.dtype}, {k.dtype}, {v.dtype})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"the Gluon forward supports head_dim {SUPPORTED_HEAD_DIMS} (got {q.shape[-1]})"
    if q.shape[2] % k.shape[2] or k.shape[2] != v.shape[2]:
        return f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
    if params is not None and params.features:
        return (f"the Gluon forward does not support segments, window, softcap, sinks or dropout (this call uses "
                f"{', '.join(params.features)})")
    return None


def gluon_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams, *,
                       warp_spec: int = 0):
    """Same arguments and result as :func:`flash.flash_attn_forward`: ``(out [B, Sq, Hq, D], lse [B, Hq, Sq]
    float32, natural log)``. Raises ``NotImplementedError`` (with the reason) for calls outside its subset;
    :func:`unsupported_reason` tells beforehand.

    ``warp_spec``: 0: the 8 math warps also issue the K/V loads; 1: a separate 1-warp TMA producer partition
    (``gl.warp_specialize``, 24 registers, the math warps get 240); 2: as 1, and the two math warpgroups are
    separate partitions (64 query rows each, FA3's layout), so they need not run in lockstep; 3: as 2, plus FA3's
    ping-pong (the warpgroups take turns issuing their GEMMs, mbarrier hand-off)."""
    if warp_spec not in (0, 1, 2, 3):
        raise ValueError(f"warp_spec must be 0, 1, 2 or 3, got {warp_spec!r}")
    reason = unsupported_reason(q, k, v, params)
    if reason is not None:
        raise NotImplementedError(reason)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    alloc = (lambda shape, dt: torch.full(shape, float("nan"), dtype=dt, device=q.device)) if POISON else \
        (lambda shape, dt: torch.empty(shape, dtype=dt, device=q.device))
    out = alloc((batch, seqlen_q, heads_q, head_dim), q.dtype)
    lse = alloc((batch, heads_q, seqlen_q), torch.float32)
    if batch == 0 or seqlen_q == 0 or heads_q == 0:
        return out, lse
    if seqlen_k == 0:
        return out.zero_(), lse.zero_()
    cfg = _config(head_dim, warp_spec)
    q, k, v = tma_ready(q), tma_ready(k), tma_ready(v)
    grid = (cdiv(seqlen_q, cfg["BLOCK_M"]), batch * heads_q)
    sub_m = cfg["BLOCK_M"] // (2 if warp_spec >= 2 else 1)  # rows of Q/O per consumer partition
    _attn_fwd_gluon[grid](
        rows_descriptor(q, sub_m), rows_descriptor(k, cfg["BLOCK_N"]), rows_descriptor(v, cfg["BLOCK_N"]),
        rows_descriptor(out, sub_m), lse, lse.stride(0), lse.stride(1),
        seqlen_q, seqlen_k, heads_q, heads_q // heads_kv, params.scale * LOG2E,
        CAUSAL=params.causal, WARP_SPEC=int(warp_spec), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HEAD_DIM=head_dim, NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
    )
    return out, lse
