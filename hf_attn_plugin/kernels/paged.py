"""Triton kernels for the paged KV cache: K/V write, paged attention (decode and prefill, split-K merged in-kernel).

Pools are ``[num_pages, page_size, H_kv, D]`` (see :mod:`hf_attn_plugin.paged.allocator`); the last
dimension must be contiguous. Semantics are :func:`hf_attn_plugin.reference.attention_reference` on
each sequence's gathered cache: the ``n`` new query tokens of a sequence with ``L`` cached tokens sit
at key positions ``L-n .. L-1`` (bottom-right aligned), keys before ``k_starts[b]`` are padding.

One attention kernel serves decode and prefill. A program owns (sequence, KV head, query tile,
split): its M rows are ``BLOCK_Q`` query tokens x ``HEAD_PAD`` query heads of one GQA group
(``row = token * HEAD_PAD + head``), so every K/V tile is loaded once for the whole group. Decode
uses ``BLOCK_Q = 1`` (the group's heads padded to >= 16 rows for ``tl.dot``). Keys are walked in
tiles of ``BLOCK_N`` positions; each position finds its page through the block table, so a tile may
span several pages or part of one (each tile loads the next tile's page numbers, so that Triton's
pipeliner can multi-buffer the K/V loads). A contiguous cache seen as pages of one position (the decode
route, :mod:`hf_attn_plugin.decode_ops`) has no table: the kernel computes the pages. V may have a head
dim of its own (``HEAD_DIM_V``: multi-head latent attention). With ``num_splits > 1`` (split-K) the
grid has room for that many contiguous pieces per query tile; how many a sequence actually uses is
decided in the kernel from the lengths in ``seq_lens`` (see :func:`_piece_tiles`): long sequences of a
skewed batch are cut finely, sequences of a uniform batch that already fills the GPU stay whole. Each piece writes a
normalised partial output and its log-sum-exp and counts itself done on a per-(sequence, KV head,
query tile) counter; the last piece to finish merges all of them (and the sinks) in split order
(:func:`_merge_pieces`: the result does not depend on which piece is last) and puts the counter
back to 0, so one launch does the whole call and every launch or CUDA-graph replay starts from
zeros. Unused splits exit at once, and a sequence left whole writes its output directly. The grid
depends only on shapes and ``num_splits``, never on sequence lengths, and nothing is read back to
the host, so a decode step can be captured in a CUDA graph.

Host side, FlashInfer's shape: a :class:`Plan` settles a step's launch geometry once (GQA packing, config,
query tile, split-K grid, partial buffers) and :func:`run` launches one layer with it; :func:`paged_attention`
is one call's plan and run.

Scores use base-2 exponentials: ``scale * log2(e)`` is folded into one multiplier. Scores, masks and the
online-softmax step are those of the flash kernels (:mod:`hf_attn_plugin.kernels.primitives`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import configs
from .configs import INTERPRET_SPLIT_PROGRAMS
from .flash import check_head_dim
from .host import cdiv, next_power_of_2, relauncher  # plain Python: triton's are ~3-13 us wrapped calls on the host
from .primitives import LOG2E, finish_softmax, mask_scores, online_softmax_step, score_scales, scores

__all__ = ["Plan", "write_kv", "run", "paged_attention", "default_num_splits"]


# --------------------------------------------------------------------------- write
@triton.jit
def _write_kv_kernel(
    k_new_ptr, v_new_ptr, k_pool_ptr, v_pool_ptr, slot_ptr,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing to write
        return
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_new_ptr + t * stride_knt + h * stride_knh + d, mask=mask)
    v = tl.load(v_new_ptr + t * stride_vnt + h * stride_vnh + d, mask=mask)
    tl.store(k_pool_ptr + page * stride_kp + offset * stride_ks + h * stride_kh + d, k, mask=mask)
    tl.store(v_pool_ptr + page * stride_vp + offset * stride_vs + h * stride_vh + d, v, mask=mask)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter ``k_new``/``v_new`` ``[T, H_kv, D]`` into the pools at ``slot_mapping`` ``[T]`` (``-1`` skips)."""
    num_tokens, num_heads, head_dim = k_new.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k_new, v_new, k_pool, v_pool, slot_mapping,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=next_power_of_2(num_heads),
        BLOCK_D=next_power_of_2(head_dim), PAGE_SIZE=k_pool.shape[1],
    )


# --------------------------------------------------------------------------- attention
@triton.jit
def _normalize(acc, m, l, sinks_ptr, head, row_ok, SINKS: tl.constexpr):
    """``acc / l`` with the row's sink logit (base 2: ``sink * log2 e``) added to the denominator.

    ``acc`` is scaled by ``exp2(-m)``; rows with neither keys nor sink (l == 0) give 0.
    """
    if SINKS:  # one more online-softmax step: a key column with logit `sink` and a value row of zeros
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        _, alpha, m, l = online_softmax_step(sink[:, None], m, l, MASKED=False)
        acc = acc * alpha[:, None]
    out, _ = finish_softmax(acc, m, l)
    return out


@triton.jit
def _piece_tiles(seq_lens_ptr, num_seqs, target_pieces, min_split_tiles, BLOCK_N: tl.constexpr,
                 BLOCK_B: tl.constexpr):
    """Split-K piece length in key tiles, from the batch's lengths (identical in every program).

    ``min(typical, total / target_pieces)`` keys, at least ``min_split_tiles`` tiles. ``typical`` is
    the geometric mean of the non-empty lengths: a few very long sequences barely move it, so they
    are cut into pieces about as long as the other sequences (no long tail), while a uniform batch
    keeps whole sequences. ``total / target_pieces`` (``target_pieces`` ~ the programs that fill the
    GPU, per KV head) cuts further when the batch alone is too small to fill it.
    """
    total = tl.full([], 0, tl.int32)
    log_sum = tl.full([], 0.0, tl.float32)
    count = tl.full([], 0, tl.int32)
    for b0 in range(0, num_seqs, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        n = tl.load(seq_lens_ptr + b, mask=b < num_seqs, other=0)
        live = n > 0
        total += tl.sum(n, 0)
        log_sum += tl.sum(tl.where(live, tl.log2(tl.maximum(n, 1).to(tl.float32)), 0.0), 0)
        count += tl.sum(live.to(tl.int32), 0)
    typical = tl.exp2(log_sum / tl.maximum(count, 1).to(tl.float32)).to(tl.int32)
    keys = tl.minimum(typical, tl.cdiv(total, target_pieces))
    return tl.maximum(tl.cdiv(keys, BLOCK_N), min_split_tiles)


# The block-table row stride of the decode route over a contiguous cache is its key count; the split counts follow the
# capacity (primitives.LENGTH_ARGS).
@triton.jit(do_not_specialize_on_alignment=("stride_bt", "stride_bv", "num_splits", "min_split_tiles",
                                             "target_pieces"))
def _paged_attention_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, out_ptr, part_out_ptr, part_lse_ptr, done_ptr,
    block_tables_ptr, seq_lens_ptr, k_starts_ptr, cu_seqlens_q_ptr, sinks_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_bv,
    sm_scale2, cap_scale, cap2, window, num_splits, min_split_tiles, target_pieces,
    GROUP: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, VARLEN: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr, HAS_K_STARTS: tl.constexpr, DOT_PRECISION: tl.constexpr, MERGE_S: tl.constexpr,
    TABLE: tl.constexpr, GROUP_PAD: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * HEAD_PAD
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    if SPLIT_K:
        q_tile = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
    else:
        q_tile = tl.program_id(2)
        split = 0

    seq_len = tl.load(seq_lens_ptr + seq)
    if VARLEN:
        q_first = tl.load(cu_seqlens_q_ptr + seq)
        num_q = tl.load(cu_seqlens_q_ptr + seq + 1) - q_first
    else:  # decode: token `seq` is the one query of sequence `seq`
        q_first = seq
        num_q = 1
    if q_tile * BLOCK_Q >= num_q:
        return
    if HAS_K_STARTS:  # left padding: keys before k_start are not part of the sequence
        k_start = tl.load(k_starts_ptr + seq)
    else:
        k_start = seq_len * 0

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // HEAD_PAD  # query token within the sequence
    g = rows % HEAD_PAD
    row_ok = (tok < num_q) & (g < GROUP)
    head = kv_head * GROUP + g
    pos = seq_len - num_q + tok  # key position of each query row (bottom-right aligned)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    dv = tl.arange(0, BLOCK_DV)  # V, the output and the partials are HEAD_DIM_V wide (MLA: not HEAD_DIM)
    dv_ok = dv < HEAD_DIM_V
    token = (q_first + tok).to(tl.int64)

    # Keys this query tile may see, [lo, hi), cut into `pieces` <= num_splits runs of whole BLOCK_N tiles
    # (_piece_tiles sets their length); splits past the last piece exit at once.
    first_pos = seq_len - num_q + q_tile * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, seq_len) - 1
    if CAUSAL:
        hi = last_pos + 1
    else:
        hi = seq_len
    lo = k_start
    if WINDOW:
        lo = tl.maximum(lo, first_pos - window + 1)
    tile_lo = lo // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(hi, BLOCK_N) - tile_lo, 0)
    if SPLIT_K:
        piece = _piece_tiles(seq_lens_ptr, tl.num_programs(0), target_pieces, min_split_tiles, BLOCK_N, 128)
        pieces = tl.minimum(tl.maximum(num_tiles // piece, 1), num_splits)
    else:
        pieces = 1
    tiles_per_split = tl.cdiv(num_tiles, pieces)
    pieces = tl.cdiv(num_tiles, tl.maximum(tiles_per_split, 1))  # those with keys (9 tiles in 4: 3 of 3)
    start = (tile_lo + split * tiles_per_split) * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)
    whole = pieces <= 1  # one piece: its program writes the final output itself, as without split-K
    if SPLIT_K:  # partials [T, Hq, num_splits, (Dv)]: normalised output and base-2 log-sum-exp
        part = (token * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        if (split > 0) & (whole | (split >= pieces)):  # no piece: lse -inf marks it (tests count the pieces)
            tl.store(part_lse_ptr + part, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)
            return

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt  # TABLE: the sequence's row of the block table
    first_page = seq.to(tl.int64) * stride_bt  # no TABLE: pages of one position, sequence `seq`'s first (K's;
    first_page_v = seq.to(tl.int64) * stride_bv  # V's: the same position, its own numbering, e.g. another layout)
    if TABLE:  # the first tile's pages; each iteration loads the next tile's, so that K/V addresses never wait on a
        # load of their own iteration and the pipeliner multi-buffers them (it keeps one buffer otherwise)
        j = start + tl.arange(0, BLOCK_N)
        next_page = tl.load(table + j // PAGE_SIZE, mask=j < end, other=0)
    for k0 in range(start, end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        if TABLE:  # K and V pools share the block table
            page = next_page.to(tl.int64)
            next_page = tl.load(table + (j + BLOCK_N) // PAGE_SIZE, mask=j + BLOCK_N < end, other=0)
            page_v = page
            in_page = j % PAGE_SIZE
        else:  # position j is page first_page + j: addresses without a dependent load
            page = first_page + j
            page_v = first_page_v + j
            in_page = 0
        k = tl.load(k_pool_ptr + (page * stride_kp + in_page * stride_ks + kv_head * stride_kh)[:, None] + d[None, :],
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_pool_ptr + (page_v * stride_vp + in_page * stride_vs + kv_head * stride_vh)[:, None]
                    + dv[None, :], mask=j_ok[:, None] & dv_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = scores(qk, sm_scale2, cap_scale, cap2, SOFTCAP)
        s = mask_scores(s, pos[:, None], j[None, :], k_start, end, window, CHECK_START=HAS_K_STARTS,
                        CHECK_END=True, CAUSAL=CAUSAL, WINDOW=WINDOW)
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, MASKED=True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if not SPLIT_K:
        out = _normalize(acc, m_i, l_i, sinks_ptr, head, row_ok, SINKS)
        _store_out(out_ptr, out, token, head, dv, row_ok, dv_ok, stride_ot, stride_oh)
    elif whole:  # final output (lse = +inf in split 0 marks a row left whole)
        out = _normalize(acc, m_i, l_i, sinks_ptr, head, row_ok, SINKS)
        _store_out(out_ptr, out, token, head, dv, row_ok, dv_ok, stride_ot, stride_oh)
        tl.store(part_lse_ptr + part, tl.full([BLOCK_M], float("inf"), tl.float32), mask=row_ok)
    else:
        out, lse = finish_softmax(acc, m_i, l_i)
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_V + dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])
        # The last of the pieces to finish merges them. The barrier orders every thread's partials before the
        # counter's release (one thread's acq_rel atomic); its result reaches all threads through shared memory
        # after that thread's acquire, so the merge reads every piece's partials (from L2: .cg).
        tl.debug_barrier()
        slot = (seq * tl.num_programs(1) + kv_head) * (tl.num_programs(2) // num_splits) + q_tile
        if tl.atomic_add(done_ptr + slot, 1, sem="acq_rel", scope="gpu") == pieces - 1:
            tl.atomic_xchg(done_ptr + slot, 0, sem="relaxed", scope="gpu")  # zero for the next launch / replay
            _merge_pieces(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, (q_first + q_tile * BLOCK_Q).to(tl.int64),
                          tl.minimum(BLOCK_Q, num_q - q_tile * BLOCK_Q), kv_head * GROUP, GROUP * tl.num_programs(1),
                          num_splits, pieces, stride_ot, stride_oh, GROUP, GROUP_PAD, HEAD_DIM_V, BLOCK_DV, MERGE_S,
                          SINKS)


@triton.jit
def _store_out(out_ptr, out, token, head, d, row_ok, d_ok, stride_ot, stride_oh):
    """The final output rows. The pointers are formed here, at the store: a [rows, D] tile of 64-bit pointers kept
    live across the split-K barrier and atomic cost prefill tiles 35-55 registers (ptxas, sm_90)."""
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_pieces(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, first_token, num_tokens, first_head, heads_q,
                  num_splits, pieces, stride_ot, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, MERGE_S: tl.constexpr, SINKS: tl.constexpr):
    """Merge splits ``0 .. pieces-1`` of the tile's query rows (``num_tokens`` tokens x ``GROUP`` heads) into ``out``.

    One token at a time, the group's heads together: ``MERGE_S`` splits of every head per step loaded at once
    (``[GROUP_PAD, MERGE_S, Dv]``: one round trip to L2 per step; the merge is the launch's serial tail), folded
    in split order with the online-softmax rescale: the result does not depend on which program runs it. Per
    split: ``2^lse * out`` is that piece's unnormalised sum, so ``acc = sum_s 2^(lse_s - m) * out_s`` and
    ``l = sum_s 2^(lse_s - m)`` are the whole row's, scaled by ``2^-m``.
    """
    g = tl.arange(0, GROUP_PAD)
    s = tl.arange(0, MERGE_S)
    d = tl.arange(0, BLOCK_DV)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM_V
    head = first_head + g
    for t in range(0, num_tokens):
        token = first_token + t
        part0 = (token * heads_q + head) * num_splits  # [GROUP_PAD]: each head's split 0
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_DV], tl.float32)
        for s0 in range(0, pieces, MERGE_S):
            part = part0[:, None] + (s0 + s)[None, :]  # [GROUP_PAD, MERGE_S]
            ok = g_ok[:, None] & (s0 + s < pieces)[None, :]
            lse = tl.load(part_lse_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(part_out_ptr + part[:, :, None] * HEAD_DIM_V + d[None, None, :],
                        mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(lse, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key: lse -inf, out 0
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe[:, None])
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
            l = l * alpha + tl.sum(w, 1)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        out = _normalize(acc, m, l, sinks_ptr, head, g_ok, SINKS)
        tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])


MERGE_TILE = 4096  # fp32 partials the merge loads per step: [group, splits, D], 32 registers a thread at 4 warps


def _merge_splits(group: int, head_dim: int) -> int:
    """Splits per merge step (a power of two): every head of the group, MERGE_TILE values at most."""
    return max(1, min(MAX_SPLITS, MERGE_TILE // (next_power_of_2(group) * next_power_of_2(head_dim))))


def _head_pad(group: int, decode: bool) -> int:
    pad = next_power_of_2(group)
    return max(pad, 16) if decode else pad


MAX_SPLITS = 64
LONG_PIECE_KEYS = 1024  # piece length of the room a batch that fills the GPU keeps for its long sequences


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fill_programs(device: torch.device) -> int:
    """Attention programs that keep every SM busy: about four per SM (decode sweep, NOTES_paged.md)."""
    if device.type != "cuda":
        return INTERPRET_SPLIT_PROGRAMS
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def default_num_splits(num_programs: int, max_context: int, device: torch.device, num_q_tiles: int = 1,
                       min_split_keys: int = LONG_PIECE_KEYS) -> int:
    """Split-K grid size from shapes only, so a decode step keeps one grid (CUDA graphs).

    ``num_programs`` = sequences x KV heads x query tiles; ``max_context`` is the block table's
    capacity, not a length. The grid is only room: the kernel picks each sequence's piece count from
    the actual lengths (:func:`_piece_tiles`: about ``fill`` programs in all, pieces of at least
    ``min_split_keys``), splits past a sequence's last piece exit at once, and the pieces are merged
    in the same launch.

    One query tile per sequence (decode): room for

    * ``fill / num_programs`` pieces per sequence (``fill`` = 4 programs per SM, 528 on an H200): what a
      uniform batch too small to fill the GPU needs. B=1 with 8 KV heads is 8 programs without a split,
      on 132 SMs, each walking the whole cache one 64-key tile after another: latency-bound (4 TB/s
      would stream B=1 x 4k keys, 8.4 MB at D=64 bf16, in 2 us);
    * pieces of :data:`LONG_PIECE_KEYS` over the capacity: the long sequences of a skewed batch that
      fills the GPU (the kernel cuts them to the batch's typical length; NOTES_paged.md);
    * never a piece shorter than ``min_split_keys`` (GPU decode configs: 128 keys: two 64-key tiles at
      D 128/256, one 128-key tile at D <= 64, whose default measured faster even so: NOTES_decode.md), at
      most :data:`MAX_SPLITS`.

    H200, 32/8 heads: B=1 x 576 keys: 4 (the kernel uses 3 pieces of 192 keys: 24 programs); B=1 x 4k:
    32 (256 programs of 128 keys); B=1 x 32k: 64 (512 programs of 512 keys); B=16 x 4k: 5 (the kernel
    uses 4 of 1024 keys: 512 programs); B=64 x 4k: 4 (512 programs fill the GPU: the kernel keeps every
    sequence whole). Before session 7 the room was ``capacity / 1024`` alone: 1, 4 and 32 splits at B=1.
    Cost of a split: partials ``T x Hq x splits x (D + 1)`` fp32 written and read once (B=1 x 32k, 64
    splits, D=64: 0.53 MB, 0.8% of the 67 MB of K/V; B=1 x 576: 33 KB), the last piece's merge (a
    few us at most, one program per (sequence, KV head)), and no extra launch: the same rule serves
    eager calls, whose launches cost host time, and CUDA-graph replays.

    Several query tiles (prefill): no split once the programs fill every SM twice, else about four
    programs per SM (partials are per query token: prefill cannot afford room for every case).
    """
    if device.type != "cuda":
        return 1
    room = max(1, min(max_context // min_split_keys, MAX_SPLITS))
    fill = _fill_programs(device)
    if num_q_tiles == 1:
        return max(1, min(room, max(max_context // LONG_PIECE_KEYS, cdiv(fill, max(num_programs, 1)))))
    return 1 if 2 * num_programs >= fill else min(room, cdiv(fill, max(num_programs, 1)))


class Plan:
    """One step's launch geometry, built once and shared by every layer of the step (FlashInfer's plan/run).

    A step's layers differ only in their K/V pools and their parameters; everything that depends on the shapes
    and the index tensors is settled here: the GQA packing (``group``, ``head_pad``), and per set of features
    (causal, window, softcap, sinks: each picks its own config) the query tile, the split-K grid and the
    partial buffers (:meth:`launch`, filled on first use: a model with sliding and full layers holds two).
    Layers run one after another on one stream, so they share the partial buffers.

    ``q_shape`` ``(T, Hq, D)``, ``pool_shape`` ``[num_pages, page_size, H_kv, D]``; the index tensors are those
    of :func:`paged_attention` (``cu_seqlens_q`` ``None``: decode). ``num_splits`` 0: :func:`default_num_splits`;
    ``config``: force a launch config (tests, tuning).

    ``block_tables`` ``None``: no table; the "pools" :func:`run` takes are then the caches ``[B, Sk, H_kv, D]``
    themselves (:mod:`hf_attn_plugin.decode_ops`), read as pages of one position (page stride: the position stride):
    position ``j`` of sequence ``b`` is page ``b * rows + j`` of the K cache and ``b * rows_v + j`` of the V cache
    (``rows_v`` 0: ``rows``; ``rows`` = batch stride / position stride), for ``capacity`` positions per sequence.
    The kernel computes the pages instead of loading them. ``pool_shape`` is then ``(pages, 1, H_kv, D)``.

    ``head_dim_v``: the value pool's head dim where it differs from ``D`` (multi-head latent attention: DeepSeek's
    192 and 128); the output is then ``(T, Hq, head_dim_v)``. The launch config is picked by the wider of the two
    (as the flash kernels pick theirs).
    """

    __slots__ = ("q_shape", "dtype", "device", "page_size", "heads_kv", "block_tables", "seq_lens", "cu_seqlens_q",
                 "max_seqlen_q", "k_starts", "num_splits", "config", "decode", "group", "head_pad", "launches",
                 "table_stride", "table_stride_v", "capacity", "head_dim_v")

    def __init__(self, q_shape: tuple, dtype: torch.dtype, device: torch.device, pool_shape: tuple,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
                 max_seqlen_q: int, k_starts: torch.Tensor | None, num_splits: int = 0,
                 config: configs.Config | None = None, *, rows: int = 0, rows_v: int = 0, capacity: int = 0,
                 head_dim_v: int = 0):
        num_tokens, heads_q, head_dim = q_shape
        check_head_dim(head_dim, "paged")  # the flash kernels' set: pointer loads here, same tl.dot limits
        self.head_dim_v = head_dim_v or head_dim
        check_head_dim(self.head_dim_v, "paged", name="value head_dim")
        self.q_shape, self.dtype, self.device = tuple(q_shape), dtype, device
        self.page_size, self.heads_kv = pool_shape[1], pool_shape[2]
        if block_tables is None:
            if self.page_size != 1 or rows <= 0 or capacity <= 0:
                raise ValueError("a Plan without block tables needs pages of one position, rows and capacity > 0")
            self.table_stride, self.table_stride_v, self.capacity = rows, rows_v or rows, capacity
        else:
            self.table_stride, self.capacity = block_tables.stride(0), block_tables.shape[1] * self.page_size
            self.table_stride_v = self.table_stride  # (unused: V reads K's pages)
        self.block_tables, self.seq_lens, self.cu_seqlens_q = block_tables, seq_lens, cu_seqlens_q
        self.max_seqlen_q, self.k_starts, self.num_splits, self.config = max_seqlen_q, k_starts, num_splits, config
        self.decode = cu_seqlens_q is None
        self.group = heads_q // self.heads_kv
        self.head_pad = _head_pad(self.group, self.decode)
        self.launches: dict = {}  # (causal, window > 0, softcap > 0, has sinks) -> _Launch

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, params) -> torch.Tensor:
        """:func:`run` with this plan."""
        return run(q, k_pool, v_pool, self, params)

    def launch(self, causal: bool, window: bool, softcap: bool, sinks: bool) -> "_Launch":
        """The launch of the layers with these features (built on first use)."""
        key = (causal, window, softcap, sinks)
        launch = self.launches.get(key)
        if launch is None:
            launch = self.launches[key] = _Launch(self, *key)
        return launch


class _Launch:
    """Config, query tile, split-K grid and partial buffers of a :class:`Plan` for one set of features."""

    __slots__ = ("cfg", "block_q", "num_splits", "grid", "min_split_tiles", "target_pieces", "part_out", "part_lse",
                 "done", "kernel")

    def __init__(self, plan: Plan, causal: bool, window: bool, softcap: bool, sinks: bool):
        num_tokens, heads_q, head_dim = plan.q_shape
        num_seqs, capacity = plan.seq_lens.shape[0], plan.capacity
        max_q = plan.max_seqlen_q
        self.cfg = cfg = plan.config or configs.pick(
            "paged_decode" if plan.decode else "paged_prefill", next_power_of_2(max(head_dim, plan.head_dim_v)),
            dict(dtype=plan.dtype, causal=causal, seq_q=1 if plan.decode else max_q, seq_k=capacity,
                 group=plan.group, window=window, softcap=softcap, sinks=sinks))
        self.block_q = 1 if plan.decode else max(1, cfg.block_m // plan.head_pad)
        num_q_tiles = 1 if plan.decode else cdiv(max(max_q, 1), self.block_q)
        num_splits = plan.num_splits
        if num_splits <= 0:
            num_splits = default_num_splits(num_seqs * plan.heads_kv * num_q_tiles, capacity,
                                            plan.device, num_q_tiles, cfg.min_split_keys)
        self.num_splits = num_splits
        self.grid = (num_seqs, plan.heads_kv, num_q_tiles * num_splits)
        fill = cfg.split_programs or _fill_programs(plan.device)
        self.min_split_tiles = max(1, cfg.min_split_keys // cfg.block_n)
        self.target_pieces = max(1, -(-fill // (plan.heads_kv * num_q_tiles)))
        self.part_out = self.part_lse = self.done = None
        if num_splits > 1 and num_tokens and num_seqs:
            self.part_out = torch.empty(num_tokens, heads_q, num_splits, plan.head_dim_v, device=plan.device,
                                        dtype=torch.float32)
            self.part_lse = torch.empty(num_tokens, heads_q, num_splits, device=plan.device, dtype=torch.float32)
            # finished pieces per (sequence, KV head, query tile); the merging program puts its count back to 0
            self.done = torch.zeros(num_seqs * plan.heads_kv * num_q_tiles, device=plan.device, dtype=torch.int32)
        self.kernel = relauncher(_paged_attention_kernel, dict(
            GROUP=plan.group, HEAD_PAD=plan.head_pad, BLOCK_Q=self.block_q, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim,
            BLOCK_D=next_power_of_2(head_dim), HEAD_DIM_V=plan.head_dim_v, BLOCK_DV=next_power_of_2(plan.head_dim_v),
            PAGE_SIZE=plan.page_size, SPLIT_K=self.part_out is not None, VARLEN=not plan.decode, CAUSAL=causal,
            WINDOW=window, SOFTCAP=softcap, SINKS=sinks, HAS_K_STARTS=plan.k_starts is not None,
            DOT_PRECISION="ieee" if plan.dtype == torch.float32 else "tf32",
            MERGE_S=_merge_splits(plan.group, plan.head_dim_v), TABLE=plan.block_tables is not None,
            GROUP_PAD=next_power_of_2(plan.group),
        ), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def run(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: Plan, params) -> torch.Tensor:
    """Attention of ``q`` ``[T, Hq, D]`` (the plan's shape and dtype) over one layer's pools; ``[T, Hq, Dv]``
    (``Dv``: the plan's ``head_dim_v``, ``D`` unless the value pool's head dim differs).

    ``params``: the layer's attention parameters (``scale``, ``causal``, ``window`` and ``softcap`` with 0 or
    ``None`` meaning off, ``sinks`` ``[Hq]`` or ``None``).
    """
    return _run(q, k_pool, v_pool, plan, params.scale, bool(params.causal), params.window or 0, params.softcap or 0.0,
                params.sinks)


def _run(q, k_pool, v_pool, plan: Plan, scale: float, causal: bool, window: int, softcap: float, sinks):
    return _split(q, k_pool, v_pool, plan, scale, causal, window, softcap, sinks)[0]


def _split(q, k_pool, v_pool, plan: Plan, scale: float, causal: bool, window: int, softcap: float, sinks):
    """The attention kernel's one launch: ``(out, launch)``; ``launch`` is ``None`` when nothing ran (no tokens).

    ``out`` is final. With ``launch.part_out`` set (split-K), the partials ``[T, Hq, S, Dv]`` / ``launch.part_lse``
    ``[T, Hq, S]`` the kernel merged are left for inspection: rows whose ``part_lse[..., 0]`` is ``+inf`` were one
    piece, an lse of ``-inf`` in every row of a split marks a split without a piece. (Tests count the pieces here.)
    """
    if v_pool.shape[-1] != plan.head_dim_v:
        raise ValueError(f"the value pool's head dim {v_pool.shape[-1]} is not the plan's {plan.head_dim_v}")
    out = q.new_empty(*q.shape[:2], plan.head_dim_v)
    num_seqs = plan.seq_lens.shape[0]
    if plan.q_shape[0] == 0 or num_seqs == 0:
        return out, None
    launch = plan.launch(causal, window > 0, softcap > 0, sinks is not None)
    dummy = plan.seq_lens
    part_out, part_lse, done = (launch.part_out, launch.part_lse, launch.done) if launch.part_out is not None else (
        out, out, dummy)
    if plan.block_tables is None:  # the caches [B, Sk, H, D] themselves: a page is a position
        k_strides = k_pool.stride(1), k_pool.stride(1), k_pool.stride(2)
        v_strides = v_pool.stride(1), v_pool.stride(1), v_pool.stride(2)
    else:
        k_strides, v_strides = k_pool.stride()[:3], v_pool.stride()[:3]
    launch.kernel.launch(launch.grid, (
        q, k_pool, v_pool, out, part_out, part_lse, done,
        plan.block_tables if plan.block_tables is not None else dummy, plan.seq_lens,
        plan.k_starts if plan.k_starts is not None else dummy,
        plan.cu_seqlens_q if plan.cu_seqlens_q is not None else dummy,
        sinks if sinks is not None else dummy,
        *q.stride()[:2], *out.stride()[:2], *k_strides, *v_strides, plan.table_stride, plan.table_stride_v,
        *score_scales(scale, softcap), int(window), launch.num_splits, launch.min_split_tiles, launch.target_pieces,
    ))
    return out, launch


def _one_plan(q, k_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits, config) -> Plan:
    return Plan(q.shape, q.dtype, q.device, k_pool.shape, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts,
                num_splits, config)


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    k_starts: torch.Tensor | None,
    sinks: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    num_splits: int,
    config: configs.Config | None = None,
    *,
    return_partials: bool = False,
):
    """One call's :class:`Plan` and :func:`run`: attention of ``q`` ``[T, Hq, D]`` over paged K/V.

    ``cu_seqlens_q is None`` means decode: ``T == num_seqs``, one query per sequence. Otherwise the
    new tokens of sequence ``b`` are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and
    ``max_seqlen_q`` bounds their count (it sizes the grid). ``window``/``softcap`` <= 0 mean off.
    ``num_splits`` >= 1 is the split-K grid size (0: :func:`default_num_splits`).

    ``return_partials`` (tests, benchmarks): ``(out, partials)``, ``out`` final; ``partials`` is ``None`` without
    split-K, else ``(part_out [T, Hq, S, D], part_lse [T, Hq, S])`` as the kernel left them (see :func:`_split`:
    the piece counts can be read from ``part_lse``).
    """
    plan = _one_plan(q, k_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts, num_splits, config)
    out, launch = _split(q, k_pool, v_pool, plan, scale, causal, window, softcap, sinks)
    if not return_partials:
        return out
    return out, ((launch.part_out, launch.part_lse) if launch is not None and launch.part_out is not None else None)
