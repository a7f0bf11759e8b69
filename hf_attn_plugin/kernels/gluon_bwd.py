"""Experimental FlashAttention-3-style dK/dV backward for Hopper (sm_90), written in Gluon (Triton 3.6).

Status: a per-key choice of the launch-config system, as the Gluon forward: a ``("bwd_dkdv", 64 | 128)`` config with
``gluon`` >= 0 (kernels/configs.py, after the Triton candidates) names a variant, and
:func:`hf_attn_plugin.kernels.flash.flash_attn_backward` runs it where :func:`unsupported_reason` allows, else the
key's Triton dK/dV config. dQ stays the Triton ``_attn_bwd_dq`` pass and ``delta = rowsum(dO * O)`` the Triton
``_bwd_preprocess`` launch (both in flash.py): this module computes dK and dV only, from the same inputs.

Subset (else :func:`unsupported_reason` says why): the Gluon forward's (q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]``,
bf16/fp16, D in {64, 128}, GQA, causal bottom-right aligned or not, no segments/window/softcap/sinks/dropout, sm_90).

Kernel structure (one CTA = ``BLOCK_N`` = 128 keys of one (batch, kv head); deterministic, no atomics):

* K and V of the tile go to shared memory once (TMA, 4-D descriptors over ``[B, S, H, D]``: ragged rows read as
  zeros and are clipped on store); dK and dV accumulate in registers (fp32, wgmma accumulator layout, two
  warpgroups of 64 keys each).
* The CTA loops over the query heads of its GQA group and, per head, over the query tiles that see the key tile
  (causal: tiles whose rows all precede the key tile are skipped; only diagonal tiles are masked). Q and dO tiles
  (``BLOCK_M`` rows) and their lse and delta rows come through a ``NUM_STAGES`` TMA ring with one "ready"
  mbarrier per stage (lse/delta by 2-D descriptors ``[B * Hq, Sq]`` whose row stride is flash.py's padded
  ``round_up(Sq, 4)``: TMA needs 16-byte aligned row strides; rows past ``Sq`` load as zeros and are masked).
* Transposed formulation (no transposes of P or dS): ``S^T = K Q^T``, ``P^T = exp2(S^T * scale * log2 e - lse *
  log2 e)``, ``dV += P^T dO``, ``dP^T = V dO^T``, ``dS^T = P^T * (dP^T - delta)``, ``dK += dS^T Q``; P^T and dS^T
  stay in registers as the A operand of their wgmma. The dP^T accumulator starts at ``-delta`` (one register
  vector less live). Order per query tile: issue S^T and dP^T; P^T (exp2) while dP^T runs; dS^T; issue dV and dK
  together, wait, release the stage. (Issuing dV before dS^T spilled at D128: registers, not overlap, bound.)
* ``warp_spec`` 0: the 8 math warps issue the ring refills themselves; 1: a 1-warp TMA producer partition
  (``gl.warp_specialize``, 24 registers, math warps 240) keeps the ring full and the math warps release stages on
  an "empty" mbarrier; 2: as 1, with the two math warpgroups as separate partitions (64 keys each, own K/V
  buffers, dK/dV stores and barrier; "empty" counts both), so they drift apart and one's elementwise work runs
  under the other's wgmma instead of meeting at a CTA-wide barrier every tile.
* Masks only where needed: causal diagonal tiles and the ragged last query tile of each head (its rows past ``Sq``
  have q = dO = lse = delta = 0, so P^T = 1 there and is zeroed). Rows that see no key (causal, Sq > Sk)
  have lse = 0 and are masked.
"""

from __future__ import annotations

from typing import Optional

import torch

from .host import cdiv, tma_ready
from .params import AttentionParams
from .primitives import LENGTH_ARGS

# (IMPORT_ERROR: read as gluon_bwd.IMPORT_ERROR)
from .gluon_api import (IMPORT_ERROR, LOG2E, TensorDescriptor, descriptor, fence_async_shared, gl, gluon,  # noqa: F401
                        mbarrier, rows_descriptor, tma, warpgroup_mma, warpgroup_mma_wait)
SUPPORTED_HEAD_DIMS = (64, 128)
WARP_SPEC_VARIANTS = (0, 1, 2)


def _config(head_dim: int, warp_spec: int = 0) -> dict:
    """Tile sizes: 128 keys per CTA (two warpgroups of 64), 64 query rows per ring stage; 2 stages at D128, 3 at
    D64. ``num_warps`` is the default partition's: both math warpgroups (0, 1) or (2) only the first; the
    producer warp of 1 and 2 and the second math warpgroup of 2 come on top."""
    if warp_spec not in WARP_SPEC_VARIANTS:
        raise ValueError(f"warp_spec must be one of {WARP_SPEC_VARIANTS} for the Gluon dK/dV kernel, got "
                         f"{warp_spec!r}")
    return dict(BLOCK_M=64, BLOCK_N=128, NUM_STAGES=2 if head_dim == 128 else 3,
                num_warps=4 if warp_spec >= 2 else 8)


if gluon is not None:

    @gluon.jit
    def _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs, delta_bufs, ready, b, head0,
                   heads_q, it, t_lo, n_tiles, total, stage, BLOCK_M: gl.constexpr):
        """TMA the Q, dO, lse and delta rows of work item ``it`` (query head ``head0 + it // n_tiles``, query tile
        ``t_lo + it % n_tiles``) into ``stage``; nothing if ``it >= total``. lse/delta come through 2-D
        descriptors ``[B * Hq, Sq]`` (box ``[1, BLOCK_M]``): rows past ``Sq`` load as zeros, never the pad."""
        pred = it < total
        g = it // n_tiles
        m0 = (t_lo + it - g * n_tiles) * BLOCK_M
        bar = ready.index(stage)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes + lse_desc.block_type.nbytes
                        + delta_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(q_desc, [b, m0, head0 + g, 0], bar, q_bufs.index(stage), pred=pred)
        tma.async_copy_global_to_shared(do_desc, [b, m0, head0 + g, 0], bar, do_bufs.index(stage), pred=pred)
        row = b * heads_q + head0 + g
        tma.async_copy_global_to_shared(lse_desc, [row, m0], bar, lse_bufs.index(stage).reshape([1, BLOCK_M]),
                                        pred=pred)
        tma.async_copy_global_to_shared(delta_desc, [row, m0], bar, delta_bufs.index(stage).reshape([1, BLOCK_M]),
                                        pred=pred)

    @gluon.jit
    def _producer(q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs, delta_bufs, ready, empty, b,
                  head0, heads_q, t_lo, n_tiles, total, BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
        """WARP_SPEC >= 1 worker (1 warp): keep the ring full; stage s is reused once every math partition has
        arrived on ``empty[s]``."""
        for it in range(total):
            stage = it % NUM_STAGES
            mbarrier.wait(empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1, pred=it >= NUM_STAGES)
            _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs, delta_bufs, ready, b, head0,
                       heads_q, it, t_lo, n_tiles, total, stage, BLOCK_M)

    @gluon.jit
    def _consumer(q_desc, do_desc, lse_desc, delta_desc, dk_desc, dv_desc, k_smem, v_smem, q_bufs, do_bufs, lse_bufs,
                  delta_bufs, kv_bar, ready, empty, b, kv_head, head0, heads_q, n0, t_lo, t_full, n_tiles, total,
                  seqlen_q, seqlen_k, qk_scale, sm_scale,
                  CAUSAL: gl.constexpr, WARP_SPEC: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
        """The math warps: every wgmma, the elementwise work and the epilogue (dK, dV through K/V's shared
        buffers and TMA)."""
        dtype: gl.constexpr = q_desc.dtype
        # [BLOCK_N keys, BLOCK_M queries]: S^T, P^T, dP^T, dS^T
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        # [BLOCK_N keys, HEAD_DIM]: dK, dV
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)  # per query row
        key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)  # per key

        k_tile = k_smem.reshape([BLOCK_N, HEAD_DIM])
        v_tile = v_smem.reshape([BLOCK_N, HEAD_DIM])
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
        off = seqlen_k - seqlen_q  # bottom-right causal alignment
        mbarrier.wait(kv_bar, 0)

        for it in range(total):
            stage = it % NUM_STAGES
            g = it // n_tiles
            t = t_lo + it - g * n_tiles
            m0 = t * BLOCK_M

            mbarrier.wait(ready.index(stage), (it // NUM_STAGES) & 1)
            q_tile = q_bufs.index(stage).reshape([BLOCK_M, HEAD_DIM])
            do_tile = do_bufs.index(stage).reshape([BLOCK_M, HEAD_DIM])
            zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
            s_tok = warpgroup_mma(k_tile, q_tile.permute((1, 0)), zero, use_acc=False, is_async=True)
            # dP^T - delta in one go: the accumulator starts at -delta (no delta registers live past this point)
            delta = delta_bufs.index(stage).load(col_layout)
            dp_tok = warpgroup_mma(v_tile, do_tile.permute((1, 0)), zero - gl.expand_dims(delta, 0), is_async=True)
            lse2 = lse_bufs.index(stage).load(col_layout) * 1.4426950408889634
            s = warpgroup_mma_wait(1, deps=[s_tok])  # groups retire in order: S^T done, dP^T may still run
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 0))
            if (t < t_full) | (m0 + BLOCK_M > seqlen_q):  # causal diagonal tile, or rows past Sq (q, dO, lse and
                # delta load as 0, so P^T = 1): one compare per element, key j <= limit(row i), where the limit is
                # i + off (causal; +inf without) for rows before Sq, and below every key for rows past it
                rows = m0 + gl.arange(0, BLOCK_M, layout=col_layout)
                limit = rows + off if CAUSAL else gl.full_like(rows, 2147483647)
                limit = gl.where(rows < seqlen_q, limit, -1)
                keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
                p = gl.where(gl.expand_dims(keys, 1) <= gl.expand_dims(limit, 0), p, 0.0)
            dp = warpgroup_mma_wait(0, deps=[dp_tok])
            ds = p * dp
            # dV and dK are issued together once P^T and dS^T exist: fewer live registers than issuing dV first.
            p_op = gl.convert_layout(p.to(dtype), op_layout, assert_trivial=True)
            ds_op = gl.convert_layout(ds.to(dtype), op_layout, assert_trivial=True)
            dv_tok = warpgroup_mma(p_op, do_tile, dv, is_async=True)
            dk_tok = warpgroup_mma(ds_op, q_tile, dk, is_async=True)
            dv, dk, _, _ = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, p_op, ds_op])
            # Both warpgroups must be done with the stage before it is refilled (a wgmma wait covers only the
            # issuing warpgroup).
            gl.thread_barrier()
            if WARP_SPEC:
                mbarrier.arrive(empty.index(stage))
            else:
                _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs, delta_bufs, ready, b,
                           head0, heads_q, it + NUM_STAGES, t_lo, n_tiles, total, stage, BLOCK_M)

        # Epilogue: each warpgroup overwrites only the 64 key rows of K/V it read itself (its wgmmas are done).
        k_tile.store((dk * sm_scale).to(dtype))
        v_tile.store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, n0, kv_head, 0], k_smem)
        tma.async_copy_shared_to_global(dv_desc, [b, n0, kv_head, 0], v_smem)
        tma.store_wait(0)

    @gluon.jit(do_not_specialize_on_alignment=LENGTH_ARGS)
    def _attn_bwd_dkdv_gluon(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                             seqlen_q, seqlen_k, heads_kv, group, qk_scale, sm_scale,
                             CAUSAL: gl.constexpr, WARP_SPEC: gl.constexpr, BLOCK_M: gl.constexpr,
                             BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
        num_warps: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = q_desc.dtype
        # grid = (B * Hkv, key tiles): the key-tile index varies slowest, so (causal) the longest tiles start first.
        bh = gl.program_id(0)
        n0 = gl.program_id(1) * BLOCK_N
        b = bh // heads_kv
        kv_head = bh % heads_kv
        head0 = kv_head * group
        heads_q = heads_kv * group
        off = seqlen_k - seqlen_q

        # Query tiles [t_lo, n_m) of each head see the key tile; those below t_full need the causal mask.
        n_m = gl.cdiv(seqlen_q, BLOCK_M)
        t_lo = 0
        t_full = 0
        if CAUSAL:
            t_lo = gl.minimum(gl.maximum(n0 - off, 0) // BLOCK_M, n_m)
            t_full = gl.minimum(gl.cdiv(gl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M), n_m)
        n_tiles = gl.maximum(n_m - t_lo, 1)  # (>= 1: a divisor; total is 0 when no tile sees the keys)
        total = (n_m - t_lo) * group

        # WARP_SPEC 2: two consumer partitions of one warpgroup each, each with its own SUB_N = BLOCK_N / 2 keys
        # (the host made the K/V/dK/dV descriptors SUB_N rows tall) and its own K/V buffers and barrier.
        CONSUMERS: gl.constexpr = 2 if WARP_SPEC >= 2 else 1
        SUB_N: gl.constexpr = BLOCK_N // CONSUMERS
        k_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
        # lse/delta: [stages, BLOCK_M], rank 1 per stage, unswizzled; the TMA writes a [1, BLOCK_M] view of a stage
        # (allocated in the descriptor's block shape [stages, 1, BLOCK_M], they cost ws2 16 B more shared memory)
        stat_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
        lse_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], stat_layout)
        delta_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_M], stat_layout)
        kv_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(kv_bars.index(i), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)  # every consumer partition releases every stage
        fence_async_shared()

        for i in gl.static_range(CONSUMERS):
            mbarrier.expect(kv_bars.index(i), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, n0 + i * SUB_N, kv_head, 0], kv_bars.index(i),
                                            k_bufs.index(i))
            tma.async_copy_global_to_shared(v_desc, [b, n0 + i * SUB_N, kv_head, 0], kv_bars.index(i),
                                            v_bufs.index(i))
        # (Partition argument tuples are written inline: a tuple built beforehand turns constexprs into tensors.)
        if WARP_SPEC >= 2:  # two 4-warp consumers (240 registers each) + a 1-warp producer (24)
            gl.warp_specialize([(_consumer, (q_desc, do_desc, lse_desc, delta_desc, dk_desc, dv_desc, k_bufs.index(0),
                                             v_bufs.index(0), q_bufs, do_bufs, lse_bufs, delta_bufs,
                                             kv_bars.index(0), ready, empty, b, kv_head, head0, heads_q, n0, t_lo,
                                             t_full, n_tiles, total, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL,
                                             WARP_SPEC, BLOCK_M, SUB_N, HEAD_DIM, NUM_STAGES, num_warps)),
                                (_consumer, (q_desc, do_desc, lse_desc, delta_desc, dk_desc, dv_desc, k_bufs.index(1),
                                             v_bufs.index(1), q_bufs, do_bufs, lse_bufs, delta_bufs,
                                             kv_bars.index(1), ready, empty, b, kv_head, head0, heads_q, n0 + SUB_N,
                                             t_lo, t_full, n_tiles, total, seqlen_q, seqlen_k, qk_scale, sm_scale,
                                             CAUSAL, WARP_SPEC, BLOCK_M, SUB_N, HEAD_DIM, NUM_STAGES, num_warps)),
                                (_producer, (q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs,
                                             delta_bufs, ready, empty, b, head0, heads_q, t_lo, n_tiles, total,
                                             BLOCK_M, NUM_STAGES))],
                               [num_warps, 1], [240, 24])
        elif WARP_SPEC == 1:  # a 1-warp TMA producer (24 registers) beside the 8 math warps (240)
            gl.warp_specialize([(_consumer, (q_desc, do_desc, lse_desc, delta_desc, dk_desc, dv_desc, k_bufs.index(0),
                                             v_bufs.index(0), q_bufs, do_bufs, lse_bufs, delta_bufs,
                                             kv_bars.index(0), ready, empty, b, kv_head, head0, heads_q, n0, t_lo,
                                             t_full, n_tiles, total, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL,
                                             WARP_SPEC, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, num_warps)),
                                (_producer, (q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs,
                                             delta_bufs, ready, empty, b, head0, heads_q, t_lo, n_tiles, total,
                                             BLOCK_M, NUM_STAGES))],
                               [1], [24])
        else:  # the math warps fill the ring themselves
            for i in gl.static_range(NUM_STAGES):
                _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_bufs, do_bufs, lse_bufs, delta_bufs, ready, b,
                           head0, heads_q, i, t_lo, n_tiles, total, i, BLOCK_M)
            _consumer(q_desc, do_desc, lse_desc, delta_desc, dk_desc, dv_desc, k_bufs.index(0), v_bufs.index(0),
                      q_bufs, do_bufs, lse_bufs, delta_bufs, kv_bars.index(0), ready, empty, b, kv_head, head0,
                      heads_q, n0, t_lo, t_full, n_tiles, total, seqlen_q, seqlen_k, qk_scale, sm_scale, CAUSAL,
                      WARP_SPEC, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, num_warps)

        for i in gl.static_range(CONSUMERS):
            mbarrier.invalidate(kv_bars.index(i))
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))


def unsupported_reason(q, k, v, params: Optional[AttentionParams] = None) -> Optional[str]:
    """Why this kernel cannot compute dK/dV for the call (``None``: it can). Its subset is the Gluon forward's;
    ``params`` ``None``: a call without optional features."""
    from . import gluon_fwd

    reason = gluon_fwd.unsupported_reason(q, k, v, params)
    if reason is not None:
        return f"the Gluon dK/dV kernel has the Gluon forward's limits: {reason}"
    return None  # (any Sq: lse/delta come in flash.py's padded stats layout, :func:`_stat_descriptor`)


def _stat_descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    """2-D descriptor ``[B * Hq, Sq]``, boxes ``[1, rows]``, over a float32 ``[B, Hq, Sq]`` tensor (lse, delta) in
    flash.py's stats layout (copied into it unless it has it: 16-byte aligned, row stride ``round_up(Sq, 4)``, which
    TMA needs as a multiple of 16 bytes). Columns past ``Sq`` (the pad, whatever it holds) load as zeros."""
    from .flash import padded_stats

    t = padded_stats(t)
    batch, heads, seqlen = t.shape
    return descriptor(t, [1, rows], shape=[batch * heads, seqlen], strides=[t.stride(1), 1])


def gluon_attn_backward_dkdv(dout, q, k, v, lse, delta, dk, dv, params: AttentionParams, *, warp_spec: int = 0):
    """Write dK and dV (``[B, Sk, Hkv, D]``, q's dtype, TMA-addressable, e.g. contiguous) for the backward of
    attention with ``params`` (scale, causal; no optional features), given ``lse`` (the forward's, ``[B, Hq, Sq]``
    float32, natural log) and ``delta = rowsum(dout * out)`` (``[B, Hq, Sq]`` float32;
    flash_attn_backward computes it with ``_bwd_preprocess``); both are copied into the padded stats layout unless
    they have it (flash.stats_buffer: what flash_attn_backward hands over). ``warp_spec``: the variant (0, 1, 2;
    module doc).

    Raises ``NotImplementedError`` (with the reason) for calls outside the subset (:func:`unsupported_reason`)."""
    cfg = _config(q.shape[-1], warp_spec)
    reason = unsupported_reason(q, k, v, params)
    if reason is not None:
        raise NotImplementedError(reason)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    for name, t, shape in (("dout", dout, q.shape), ("dk", dk, k.shape), ("dv", dv, v.shape)):
        if tuple(t.shape) != tuple(shape) or t.dtype != q.dtype:
            raise ValueError(f"{name} must be {tuple(shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("dout", dout), ("dk", dk), ("dv", dv)):
        if tma_ready(t) is not t:
            raise ValueError(f"{name} is not TMA-addressable (16-byte aligned base and row strides, unit last "
                             f"stride): pass a contiguous tensor")
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (batch, heads_q, seqlen_q) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [B, Hq, Sq] = {(batch, heads_q, seqlen_q)}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if batch == 0 or heads_kv == 0 or seqlen_k == 0:
        return dk, dv
    if seqlen_q == 0:
        return dk.zero_(), dv.zero_()
    q, k, v = tma_ready(q), tma_ready(k), tma_ready(v)
    grid = (batch * heads_kv, cdiv(seqlen_k, cfg["BLOCK_N"]))
    sub_n = cfg["BLOCK_N"] // (2 if warp_spec >= 2 else 1)  # keys of K/V/dK/dV per consumer partition
    _attn_bwd_dkdv_gluon[grid](
        rows_descriptor(q, cfg["BLOCK_M"]), rows_descriptor(k, sub_n), rows_descriptor(v, sub_n),
        rows_descriptor(dout, cfg["BLOCK_M"]), rows_descriptor(dk, sub_n), rows_descriptor(dv, sub_n),
        _stat_descriptor(lse, cfg["BLOCK_M"]), _stat_descriptor(delta, cfg["BLOCK_M"]),
        seqlen_q, seqlen_k, heads_kv, heads_q // heads_kv,
        params.scale * LOG2E, params.scale,
        CAUSAL=params.causal, WARP_SPEC=int(warp_spec), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HEAD_DIM=head_dim, NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
    )
    return dk, dv
