"""Triton kernels for the paged KV cache: K/V write, paged attention (decode and prefill), split-K reduce.

Pools are ``[num_pages, page_size, H_kv, D]`` (see :mod:`hf_attn_plugin.paged.allocator`); the last
dimension must be contiguous. Semantics are :func:`hf_attn_plugin.reference.attention_reference` on
each sequence's gathered cache: the ``n`` new query tokens of a sequence with ``L`` cached tokens sit
at key positions ``L-n .. L-1`` (bottom-right aligned), keys before ``k_starts[b]`` are padding.

One attention kernel serves decode and prefill. A program owns (sequence, KV head, query tile,
split): its M rows are ``BLOCK_Q`` query tokens x ``HEAD_PAD`` query heads of one GQA group
(``row = token * HEAD_PAD + head``), so every K/V tile is loaded once for the whole group. Decode
uses ``BLOCK_Q = 1`` (the group's heads padded to >= 16 rows for ``tl.dot``). Keys are walked in
tiles of ``BLOCK_N`` positions; each position finds its page through the block table, so a tile may
span several pages or part of one. With ``num_splits > 1`` (split-K) the grid has room for that many
contiguous pieces per query tile; how many a sequence actually uses is decided in the kernel from
the lengths in ``seq_lens`` (see :func:`_piece_tiles`): long sequences of a skewed batch are cut
finely, sequences of a uniform batch that already fills the GPU stay whole. Each piece writes a
normalised partial output and its log-sum-exp, and :func:`_combine_kernel` merges them (and the
sinks); unused pieces exit at once, and a sequence left whole writes its output directly. The grid
depends only on shapes and ``num_splits``, never on sequence lengths, and nothing is read back to
the host, so a decode step can be captured in a CUDA graph.

Scores use base-2 exponentials: ``scale * log2(e)`` is folded into one multiplier.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import configs
from .configs import INTERPRET_SPLIT_PROGRAMS
from .flash import check_head_dim
from .host import cdiv, next_power_of_2  # plain Python: triton's are ~3-13 us wrapped calls on the host

__all__ = ["write_kv", "paged_attention", "split_attention", "default_num_splits"]

LOG2E = 1.4426950408889634


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
def _normalize(acc, m, l, sinks_ptr, head, row_ok, HAS_SINKS: tl.constexpr):
    """``acc / l`` with the row's sink logit (base 2: ``sink * log2 e``) added to the denominator.

    ``acc`` is scaled by ``exp2(-m)``; rows with neither keys nor sink (l == 0) give 0.
    """
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m, sink)
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None]
        l = l * alpha + tl.exp2(sink - m_new)
    l = tl.where(l > 0, l, 1.0)
    return acc / l[:, None]


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


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, seq_lens_ptr, k_starts_ptr, cu_seqlens_q_ptr, sinks_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt,
    scale_log2, softcap, window, num_splits, min_split_tiles, target_pieces,
    GROUP: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_K_STARTS: tl.constexpr, PRECISION: tl.constexpr,
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
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_pos - window + 1)
    tile_lo = lo // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(hi, BLOCK_N) - tile_lo, 0)
    if SPLIT_K:
        piece = _piece_tiles(seq_lens_ptr, tl.num_programs(0), target_pieces, min_split_tiles, BLOCK_N, 128)
        pieces = tl.minimum(tl.maximum(num_tiles // piece, 1), num_splits)
    else:
        pieces = 1
    tiles_per_split = tl.cdiv(num_tiles, pieces)
    start = (tile_lo + split * tiles_per_split) * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)
    whole = pieces == 1  # one piece: its program writes the final output itself, as without split-K
    if SPLIT_K:  # partials [T, Hq, num_splits, (D)]: normalised output and base-2 log-sum-exp
        part = (token * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        if (split > 0) & (whole | (start >= end)):  # nothing to read: the combine skips an lse of -inf
            tl.store(part_lse_ptr + part, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_ok)
            return

    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for k0 in range(start, end, BLOCK_N):
        j = k0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        page = tl.load(table + j // PAGE_SIZE, mask=j_ok, other=0).to(tl.int64)
        in_page = j % PAGE_SIZE
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_pool_ptr + (page * stride_kp + in_page * stride_ks + kv_head * stride_kh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_pool_ptr + (page * stride_vp + in_page * stride_vs + kv_head * stride_vh)[:, None] + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HAS_SOFTCAP:  # softcap * tanh(s * scale / softcap), tanh through exp2 (stable at both ends)
            x = s * (scale_log2 / softcap)  # = 2 * log2(e) * (s * scale / softcap) / 2
            s = softcap * (1.0 - 2.0 / (tl.exp2(2.0 * x) + 1.0)) * 1.4426950408889634
        else:
            s = s * scale_log2
        visible = (j_ok & (j >= k_start))[None, :]
        if CAUSAL:
            visible = visible & (j[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (j[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT_K:
        out = _normalize(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif whole:  # final output; lse = +inf in split 0 tells the combine to skip the row
        out = _normalize(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        tl.store(part_lse_ptr + part, tl.full([BLOCK_M], float("inf"), tl.float32), mask=row_ok)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], out, mask=out_mask)


@triton.jit
def _combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_ot, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """Merge the splits of one (token, query head): out = sum_s 2^(lse_s - lse) * out_s.

    An lse of +inf (split 0) marks a row whose attention program wrote the final output: skipped.
    """
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    part = (token * NUM_HEADS + head) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    if tl.max(lse, 0) == float("inf"):
        return
    live = s_ok & (lse > float("-inf"))  # empty splits wrote no output
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=live[:, None] & (d < HEAD_DIM)[None, :],
                    other=0.0)
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    # Shape the merged row as a 1-row tile so _normalize serves both kernels.
    one = tl.zeros([1], tl.float32)
    acc = tl.sum(w[:, None] * parts, 0)[None, :]
    l = one + tl.sum(w, 0)
    heads = tl.zeros([1], tl.int32) + head
    out = _normalize(acc, one + m_safe, l, sinks_ptr, heads, heads >= 0, HAS_SINKS)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(d < HEAD_DIM)[None, :])


def _head_pad(group: int, decode: bool) -> int:
    pad = next_power_of_2(group)
    return max(pad, 16) if decode else pad


MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fill_programs(device: torch.device) -> int:
    """Attention programs that keep every SM busy: about four per SM (decode sweep, NOTES_paged.md)."""
    if device.type != "cuda":
        return INTERPRET_SPLIT_PROGRAMS
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def default_num_splits(num_programs: int, max_context: int, device: torch.device, num_q_tiles: int = 1,
                       min_split_keys: int = 1024) -> int:
    """Split-K grid size from shapes only, so a decode step keeps one grid (CUDA graphs).

    ``num_programs`` = sequences x KV heads x query tiles; ``max_context`` is the block table's
    capacity, not a length. One query tile per sequence (decode): room for the longest possible
    sequence in pieces of ``min_split_keys`` (at most ``MAX_SPLITS``); the kernel picks each
    sequence's piece count from the actual lengths, and unused splits exit at once. Several query
    tiles (prefill): no split once the programs fill every SM twice, else about four programs per
    SM (partials are per query token: prefill cannot afford room for every case).
    """
    if device.type != "cuda":
        return 1
    room = max(1, min(max_context // min_split_keys, MAX_SPLITS))
    if num_q_tiles == 1:
        return room
    fill = _fill_programs(device)
    return 1 if 2 * num_programs >= fill else min(room, -(-fill // max(num_programs, 1)))


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
) -> torch.Tensor:
    """Attention of ``q`` ``[T, Hq, D]`` over paged K/V; returns ``[T, Hq, D]`` in q's dtype.

    ``cu_seqlens_q is None`` means decode: ``T == num_seqs``, one query per sequence. Otherwise the
    new tokens of sequence ``b`` are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and
    ``max_seqlen_q`` bounds their count (it sizes the grid). ``window``/``softcap`` <= 0 mean off.
    ``num_splits`` >= 1 is the split-K grid size (0: :func:`default_num_splits`).
    """
    out, partials = split_attention(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, k_starts,
                                    sinks, scale, causal, window, softcap, num_splits, config)
    if partials is not None:
        part_out, part_lse = partials
        num_tokens, heads_q, head_dim = q.shape
        num_splits = part_lse.shape[-1]
        _combine_kernel[(num_tokens, heads_q)](
            part_out, part_lse, out, sinks if sinks is not None else seq_lens, out.stride(0), out.stride(1),
            num_splits, NUM_HEADS=heads_q, HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim),
            BLOCK_S=next_power_of_2(num_splits), HAS_SINKS=sinks is not None,
            num_warps=4,
        )
    return out


def split_attention(
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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The attention kernel alone (arguments of :func:`paged_attention`): ``(out, partials)``.

    ``partials`` is ``None`` without split-K (``out`` is final), else ``(part_out [T, Hq, S, D],
    part_lse [T, Hq, S])`` still to be combined into ``out``; rows whose ``part_lse[..., 0]`` is
    ``+inf`` were one piece and are final in ``out`` already. (Tests read the piece counts here.)
    """
    num_tokens, heads_q, head_dim = q.shape
    check_head_dim(head_dim, "paged")  # the flash kernels' set: pointer loads here, same tl.dot limits
    num_seqs = seq_lens.shape[0]
    heads_kv, page_size = k_pool.shape[2], k_pool.shape[1]
    group = heads_q // heads_kv
    decode = cu_seqlens_q is None
    cfg = config or configs.pick(
        "paged_decode" if decode else "paged_prefill", next_power_of_2(head_dim),
        dict(dtype=q.dtype, causal=causal, seq_q=1 if decode else max_seqlen_q,
             seq_k=block_tables.shape[1] * page_size, group=group, window=window > 0, softcap=softcap > 0,
             sinks=sinks is not None))
    head_pad = _head_pad(group, decode)
    block_q = 1 if decode else max(1, cfg.block_m // head_pad)
    num_q_tiles = 1 if decode else cdiv(max(max_seqlen_q, 1), block_q)
    if num_splits <= 0:
        max_context = block_tables.shape[1] * page_size
        num_splits = default_num_splits(num_seqs * heads_kv * num_q_tiles, max_context, q.device, num_q_tiles,
                                        cfg.min_split_keys)
    fill = cfg.split_programs or _fill_programs(q.device)

    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out, None
    if num_splits > 1:
        part_out = torch.empty(num_tokens, heads_q, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_tokens, heads_q, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out  # unused
    dummy = seq_lens
    grid = (num_seqs, heads_kv, num_q_tiles * num_splits)
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, out, part_out, part_lse,
        block_tables, seq_lens,
        k_starts if k_starts is not None else dummy,
        cu_seqlens_q if cu_seqlens_q is not None else dummy,
        sinks if sinks is not None else dummy,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        block_tables.stride(0),
        scale * LOG2E, float(softcap), int(window), num_splits, max(1, cfg.min_split_keys // cfg.block_n),
        max(1, -(-fill // (heads_kv * num_q_tiles))),
        GROUP=group, HEAD_PAD=head_pad, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), PAGE_SIZE=page_size, SPLIT_K=num_splits > 1,
        VARLEN=not decode, CAUSAL=bool(causal), HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0,
        HAS_SINKS=sinks is not None, HAS_K_STARTS=k_starts is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, ((part_out, part_lse) if num_splits > 1 else None)
