"""Paged KV cache: allocator unit tests, kernels vs the reference on the equivalent contiguous cache.

Without CUDA the kernels run in the Triton interpreter (fp32/fp16, small shapes); with CUDA the same
tests run compiled, and the ``gpu``-marked tests add bf16, large shapes and CUDA-graph capture.
"""

import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit: the interpreter is chosen there
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_attn_plugin import paged_ops, reference  # noqa: E402
from hf_attn_plugin.kernels.params import AttentionParams  # noqa: E402
from hf_attn_plugin.paged import (  # noqa: E402
    OutOfPagesError,
    OutOfSequenceSlotsError,
    PagePool,
    SequenceTooLongError,
    bytes_per_page,
    num_pages_for_budget,
)
from hf_attn_plugin.paged_ops import gather_kv, paged_attention, paged_attention_reference, write_kv  # noqa: E402

from .helpers import DEVICE as DEV, assert_fa2_rule, needs_kernels  # noqa: E402


# =========================================================================== allocator
def _cache(num_pages=16, page_size=4, max_seqs=8, max_seq_len=64, **kw):
    return PagePool(1, 1, 2, num_pages=num_pages, page_size=page_size, max_seqs=max_seqs,
                        max_seq_len=max_seq_len, dtype=torch.float32, **kw)


def _fill(cache, seq_id, values):
    """Append tokens whose K (and V = -K) rows are constant ``values[i]``; returns the slots."""
    slots = cache.append_slots(seq_id, len(values))
    k = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 1, cache.head_dim)
    write_kv(cache.k_pools[0], cache.v_pools[0], k, -k, torch.tensor(slots, dtype=torch.int64))
    return slots


def _contents(cache, seq_id):
    bt = cache.block_table(seq_id)
    k = gather_kv(cache.k_pools[0], bt, cache.seq_len(seq_id))[0, :, 0, 0]
    v = gather_kv(cache.v_pools[0], bt, cache.seq_len(seq_id))[0, :, 0, 0]
    assert torch.equal(v, -k)
    return k.tolist()


def test_append_allocates_pages_on_demand_in_order():
    cache = _cache()
    a = cache.add_sequence()
    assert cache.append_slots(a, 3) == [0, 1, 2]
    assert cache.pages(a) == [0]
    assert cache.append_slots(a, 6) == [3, 4, 5, 6, 7, 8]  # fills page 0, takes pages 1 and 2
    assert cache.pages(a) == [0, 1, 2] and cache.seq_len(a) == 9
    assert cache.block_table(a)[:3].tolist() == [0, 1, 2]
    assert cache.num_free_pages == 13
    cache.check_invariants()


def test_fork_shares_pages_and_copies_on_write():
    cache = _cache()
    parent = cache.add_sequence()
    _fill(cache, parent, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # one full page + 2 tokens
    child = cache.fork(parent)
    assert cache.pages(child) == cache.pages(parent)
    assert all(cache.allocator.refcount(p) == 2 for p in cache.pages(parent))
    free_before = cache.num_free_pages
    _fill(cache, child, [7.0])  # shared partial last page: copied first
    assert cache.num_free_pages == free_before - 1
    assert cache.pages(child)[0] == cache.pages(parent)[0]  # full page still shared
    assert cache.pages(child)[1] != cache.pages(parent)[1]
    _fill(cache, parent, [8.0])  # parent is now the only user of its page: written in place
    assert cache.num_free_pages == free_before - 1
    assert _contents(cache, parent) == [1, 2, 3, 4, 5, 6, 8]
    assert _contents(cache, child) == [1, 2, 3, 4, 5, 6, 7]
    cache.check_invariants()


def test_free_returns_pages_once_unshared():
    cache = _cache()
    a = cache.add_sequence()
    _fill(cache, a, [float(i) for i in range(10)])
    b = cache.fork(a)
    cache.free(a)
    assert cache.num_free_pages == 16 - 3  # b still holds them
    assert _contents(cache, b) == [float(i) for i in range(10)]
    cache.free(b)
    assert cache.num_free_pages == 16
    c = cache.add_sequence()
    assert c not in (a, b) and cache.row(c) in (0, 1)  # ids are new, block-table rows are reused
    cache.check_invariants()


def test_out_of_pages_is_typed_and_changes_nothing():
    cache = _cache(num_pages=4)
    a = cache.add_sequence()
    _fill(cache, a, [1.0] * 10)  # 3 pages
    b = cache.add_sequence()
    with pytest.raises(OutOfPagesError) as err:
        cache.append_slots(b, 5)  # needs 2, 1 free
    assert (err.value.needed, err.value.available) == (2, 1)
    assert cache.seq_len(b) == 0 and cache.num_free_pages == 1
    with pytest.raises(OutOfPagesError):  # all-or-nothing over a whole step
        cache.plan([a, b], [3, 4])  # 1 page each, 1 free
    assert cache.seq_len(a) == 10 and cache.seq_len(b) == 0 and cache.num_free_pages == 1
    c = cache.fork(a)  # copy-on-write needs a page too
    cache.append_slots(b, 1)
    with pytest.raises(OutOfPagesError):
        cache.append_slots(c, 1)
    assert not cache.can_append(c, 1)
    assert _contents(cache, a) == [1.0] * 10
    cache.check_invariants()


def test_limits_are_typed():
    cache = _cache(max_seqs=2, max_seq_len=8)
    a = cache.add_sequence()
    cache.add_sequence()
    with pytest.raises(OutOfSequenceSlotsError):
        cache.add_sequence()
    with pytest.raises(SequenceTooLongError):
        cache.append_slots(a, 9)
    assert cache.seq_len(a) == 0


def test_waste_metric():
    cache = _cache(page_size=4)
    assert cache.waste() == 0.0
    a = cache.add_sequence()
    cache.append_slots(a, 5)  # 2 pages, 8 slots, 5 used
    assert cache.waste() == pytest.approx(3 / 8)
    b = cache.fork(a)  # shared pages count once
    assert cache.waste() == pytest.approx(3 / 8)
    cache.append_slots(b, 1)  # COW: 3 pages, 12 slots, 4 + 1 + 2 used
    assert cache.waste() == pytest.approx(5 / 12)


def test_sizing_from_budget():
    per_page = bytes_per_page(4, 8, 128, 16, torch.bfloat16)
    assert per_page == 2 * 4 * 16 * 8 * 128 * 2
    assert num_pages_for_budget(1.0, num_layers=4, num_kv_heads=8, head_dim=128) == 2**30 // per_page
    cache = PagePool(2, 2, 8, memory_gib=1 / 1024, page_size=16, max_seqs=4, max_seq_len=64, dtype=torch.float16)
    assert cache.num_pages == 2**20 // bytes_per_page(2, 2, 8, 16, torch.float16)
    assert cache.k_pools[0].shape == (cache.num_pages, 16, 2, 8) and len(cache.v_pools) == 2
    assert cache.block_tables_host.shape == (4, 4)


def test_random_operations_leak_nothing_and_never_overwrite():
    rng = random.Random(0)
    cache = _cache(num_pages=40, page_size=4, max_seqs=12, max_seq_len=48)
    expected: dict[int, list[float]] = {}
    counter = 0.0
    for step in range(1000):
        op = rng.random()
        live = list(expected)
        try:
            if op < 0.2 or not live:
                sid = cache.add_sequence()
                expected[sid] = []
            elif op < 0.35:
                src = rng.choice(live)
                expected[cache.fork(src)] = list(expected[src])
            elif op < 0.55:
                sid = rng.choice(live)
                cache.free(sid)
                del expected[sid]
            else:
                sid = rng.choice(live)
                n = rng.randint(1, 9)
                values = [counter + i for i in range(n)]
                _fill(cache, sid, values)
                counter += n
                expected[sid].extend(values)
        except (OutOfPagesError, OutOfSequenceSlotsError, SequenceTooLongError):
            pass
        cache.check_invariants()
        if step % 50 == 0:
            for sid, vals in expected.items():
                assert _contents(cache, sid) == vals
    for sid, vals in expected.items():
        assert _contents(cache, sid) == vals
        cache.free(sid)
    assert cache.num_free_pages == cache.num_pages
    cache.check_invariants()


# =========================================================================== kernels vs reference
def _random_paged(lens, heads_kv, head_dim, page_size, dtype, spare_pages=3, k_starts=None):
    """Pools with every sequence's pages at shuffled places; slots past each length hold NaN."""
    counts = [-(-n // page_size) for n in lens]
    num_pages = sum(counts) + spare_pages
    k_pool = torch.full((num_pages, page_size, heads_kv, head_dim), math.nan, dtype=dtype)
    v_pool = torch.full_like(k_pool, math.nan)
    perm = torch.randperm(num_pages)
    width = max(counts) + 2
    block_tables = torch.randint(0, num_pages, (len(lens), width), dtype=torch.int32)  # padding: never read
    used = 0
    for b, (n, c) in enumerate(zip(lens, counts)):
        pages = perm[used : used + c]
        used += c
        block_tables[b, :c] = pages.int()
        flat_k = torch.randn(c * page_size, heads_kv, head_dim).to(dtype)
        flat_v = torch.randn(c * page_size, heads_kv, head_dim).to(dtype)
        flat_k[n:] = math.nan
        flat_v[n:] = math.nan
        k_pool[pages] = flat_k.view(c, page_size, heads_kv, head_dim)
        v_pool[pages] = flat_v.view(c, page_size, heads_kv, head_dim)
    to = dict(device=DEV)
    return (k_pool.to(**to), v_pool.to(**to), block_tables.to(**to),
            torch.tensor(lens, dtype=torch.int32, device=DEV),
            torch.tensor(k_starts, dtype=torch.int32, device=DEV) if k_starts is not None else None)


def _torch_in_dtype(q, k_pool, v_pool, block_tables, seq_lens, cu, k_starts, sinks, scale, causal, window, softcap):
    """Plain PyTorch attention with every matmul and the softmax in q's dtype (the error baseline)."""
    out = torch.zeros_like(q)
    lens = seq_lens.tolist()
    cu = cu.tolist() if cu is not None else list(range(len(lens) + 1))
    starts = k_starts.tolist() if k_starts is not None else [0] * len(lens)
    heads_q, heads_kv = q.shape[1], k_pool.shape[2]
    for b, length in enumerate(lens):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        k = gather_kv(k_pool, block_tables[b], length)[0].repeat_interleave(heads_q // heads_kv, 1).transpose(0, 1)
        v = gather_kv(v_pool, block_tables[b], length)[0].repeat_interleave(heads_q // heads_kv, 1).transpose(0, 1)
        qb = q[cu[b] : cu[b + 1]].transpose(0, 1)  # [H, n, D]
        s = (qb @ k.transpose(1, 2)) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        seg = torch.tensor([[0, 0, n, starts[b], length]], dtype=torch.int32)
        mask = reference.attention_mask_from_segments(seg, 1, n, length, causal=causal, window=window or None,
                                                       device=q.device)[0]
        s = s.masked_fill(~mask, -math.inf)
        if sinks is not None:
            s = torch.cat([s, sinks.to(s.dtype).view(-1, 1, 1).expand(-1, n, 1)], -1)
        p = torch.softmax(s, -1).nan_to_num(0.0)[..., :length]
        out[cu[b] : cu[b + 1]] = (p @ v).transpose(0, 1)
    return out


def _check(q, k_pool, v_pool, block_tables, seq_lens, *, cu=None, max_q=None, k_starts=None, sinks=None,
           causal=True, window=0, softcap=0.0, num_splits=1, config=None):
    scale = q.shape[-1] ** -0.5
    from hf_attn_plugin.kernels import paged as kernels

    out = kernels.paged_attention(q, k_pool, v_pool, block_tables, seq_lens, cu, max_q or 1, k_starts, sinks,
                                  scale, causal, window, softcap, num_splits, config)
    f64 = [t.double() for t in (q, k_pool, v_pool)]
    ref = paged_attention_reference(*f64, block_tables, seq_lens, cu, k_starts,
                                    sinks.double() if sinks is not None else None, scale, causal, window, softcap)
    base = _torch_in_dtype(q, k_pool, v_pool, block_tables, seq_lens, cu, k_starts, sinks, scale, causal, window,
                           softcap)
    assert torch.isfinite(out).all(), "unwritten or NaN output"
    assert_fa2_rule(out, ref, base)
    return out


def _sinks(heads_q):
    return torch.randn(heads_q, device=DEV)


DECODE_CASES = [
    # lens, Hq, Hkv, D, page, splits, dtype, features
    ([5, 37, 70], 8, 2, 32, 16, 1, torch.float32, {}),
    ([5, 37, 70], 8, 2, 32, 16, 3, torch.float32, {}),
    ([1, 130, 64], 4, 4, 32, 64, 2, torch.float32, {}),
    ([9, 100], 6, 2, 16, 16, 4, torch.float32, {}),  # group of 3 (not a power of two)
    ([33, 90], 8, 1, 64, 16, 3, torch.float16, {}),  # MQA, fp16
    ([20, 77], 4, 2, 32, 16, 2, torch.float32, {"window": 24}),
    ([20, 77], 4, 2, 32, 64, 1, torch.float16, {"window": 5, "softcap": 3.0}),
    ([20, 77, 3], 4, 2, 32, 16, 3, torch.float32, {"sinks": True}),
    ([20, 77, 40], 4, 2, 32, 16, 2, torch.float32, {"k_starts": [3, 50, 0], "sinks": True}),
    ([0, 45], 4, 2, 32, 16, 2, torch.float32, {"sinks": True}),  # an empty (padding) sequence
]


@needs_kernels
@pytest.mark.parametrize("lens,hq,hkv,d,page,splits,dtype,feat", DECODE_CASES)
def test_decode_matches_reference(lens, hq, hkv, d, page, splits, dtype, feat):
    pools = _random_paged([max(n, 0) for n in lens], hkv, d, page, dtype, k_starts=feat.get("k_starts"))
    k_pool, v_pool, bt, seq_lens, k_starts = pools
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    sinks = _sinks(hq) if feat.get("sinks") else None
    _check(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts, sinks=sinks, window=feat.get("window", 0),
           softcap=feat.get("softcap", 0.0), num_splits=splits)


@needs_kernels
@pytest.mark.parametrize("sinks", [False, True])
def test_decode_split_count_adapts_to_length(sinks):
    """A fixed grid of 5 splits; with >= 48 keys per split, short sequences use fewer of them."""
    from hf_attn_plugin.kernels.configs import Config

    k_pool, v_pool, bt, seq_lens, _ = _random_paged([7, 100, 300, 0], 2, 32, 16, torch.float32)
    q = torch.randn(4, 4, 32, device=DEV)
    _check(q, k_pool, v_pool, bt, seq_lens, sinks=_sinks(4) if sinks else None, num_splits=5,
           config=Config(16, 16, 4, 1, min_split_keys=48))


def _pieces_per_row(lens, num_splits, hq=4, hkv=2, d=16, page=16, config=None, **feat):
    """Split-K pieces each sequence's decode row used (read from the partial lse), after checking the output."""
    from hf_attn_plugin.kernels import paged as kernels

    k_pool, v_pool, bt, seq_lens, k_starts = _random_paged(lens, hkv, d, page, torch.float32,
                                                           k_starts=feat.get("k_starts"))
    q = torch.randn(len(lens), hq, d, device=DEV)
    sinks = _sinks(hq) if feat.get("sinks") else None
    window = feat.get("window", 0)
    _check(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts, sinks=sinks, window=window, num_splits=num_splits,
           config=config)
    _, partials = kernels.paged_attention(q, k_pool, v_pool, bt, seq_lens, None, 1, k_starts, sinks, d**-0.5, True,
                                          window, 0.0, num_splits, config, return_partials=True)
    if partials is None:  # no split-K
        return [1] * len(lens)
    lse = partials[1]
    pieces = torch.where(lse[..., 0] == math.inf, 1, (lse > -math.inf).sum(-1))  # [T, Hq]
    assert (pieces == pieces[:, :1]).all(), "heads of one sequence disagree on the split"
    return pieces[:, 0].tolist()


@needs_kernels
def test_split_pieces_follow_the_batch():
    """One grid of 8 splits; each sequence's piece count comes from the batch's lengths (device side).

    Interpreter config: 32-key tiles and pieces, 16 programs fill the "GPU" (8 pieces per KV head).
    """
    skewed = [1024, 900, 40, 50, 60, 33, 70, 0]
    pieces = _pieces_per_row(skewed, 8)
    assert pieces[0] == 8 and pieces[1] > 1  # long sequences: cut to about the typical length
    assert pieces[2:] == [1] * 6  # shorter than one piece: whole, written directly
    assert _pieces_per_row([256] * 8, 8) == [1] * 8  # uniform and enough sequences to fill: no split
    few = _pieces_per_row([256, 256], 8)  # too few sequences to fill: split anyway
    assert few[0] == few[1] > 1


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("feat", [{}, {"sinks": True}, {"window": 200, "k_starts": [100, 3, 0, 5, 0, 0]}])
def test_decode_skewed_lengths(num_splits, feat):
    """Skewed lengths (two long sequences, the rest shorter than one piece, an empty one) vs the reference."""
    lens = [300, 20, 500, 9, 0, 45]
    pieces = _pieces_per_row(lens, num_splits, **feat)
    assert pieces[1] == pieces[3] == pieces[4] == pieces[5] == 1
    if num_splits == 1:
        assert pieces == [1] * len(lens)
    elif "window" in feat:  # 200 visible keys: fewer pieces
        assert 1 < pieces[2] <= min(num_splits, 3)
    else:  # the long sequences are cut, the longest at least as finely
        assert 1 < pieces[0] <= pieces[2] <= num_splits


H200_SMS = 132  # default_num_splits' fill: 4 programs per SM = 528


def test_default_decode_split_rule(monkeypatch):
    """The decode grid on an H200 (132 SMs mocked, 32/8 heads, the GPU decode config): small batches get room to
    fill the GPU with pieces of >= 128 keys; batches that fill it keep the 1024-key room for skew only."""
    from hf_attn_plugin.kernels import configs, paged as kernels

    assert {c.min_split_keys for d in (64, 128, 256) for c in configs._GPU[("paged_decode", d)]} == {128}
    monkeypatch.setattr(kernels, "_num_sms", lambda index: H200_SMS)

    def splits(batch, capacity):
        return kernels.default_num_splits(batch * 8, capacity, torch.device("cuda", 0), 1, 128)

    assert splits(1, 576) == 576 // 128 == 4  # B=1 x 576: 8 programs unsplit; pieces of >= 128 keys
    assert splits(1, 4096) == 32 and 8 * splits(1, 4096) >= H200_SMS  # >= one program per SM
    assert splits(1, 32768) == kernels.MAX_SPLITS  # 512 programs (the kernel cuts 64 pieces of 512 keys)
    assert splits(1, 255) == 1  # less than two pieces
    assert splits(16, 4096) == 5  # 528 programs / 128
    assert splits(64, 4096) == 4 and splits(64, 32768) == 32  # 512 programs fill the GPU: capacity / 1024
    # prefill (several query tiles) and the CPU: unchanged
    assert kernels.default_num_splits(8 * 4, 4096, torch.device("cuda", 0), 4, 1024) == 4
    assert kernels.default_num_splits(8 * 40, 4096, torch.device("cuda", 0), 40, 1024) == 1
    assert kernels.default_num_splits(8, 4096, torch.device("cpu"), 1, 128) == 1


@needs_kernels
@pytest.mark.parametrize("length,num_splits,pieces", [(144, 4, 3), (1024, 32, 32), (8192, 64, 64)],
                         ids=["576_keys", "4k", "32k"])
def test_small_batch_pieces_with_h200_numbers(length, num_splits, pieces):
    """B=1 with the H200's numbers scaled to the interpreter (16-key tiles for 64, lengths / 4; one KV head whose
    share of the GPU is 66 programs, as 528 / 8 KV heads): the grid default_num_splits gives is used in full
    (576 keys: 9 tiles in 4 room -> pieces of 3 tiles, the 4th empty), and the result matches the reference."""
    from hf_attn_plugin.kernels.configs import Config

    config = Config(16, 16, 4, 1, min_split_keys=32, split_programs=66)
    assert _pieces_per_row([length], num_splits, hq=4, hkv=1, d=16, config=config) == [pieces]


@needs_kernels
@pytest.mark.parametrize("prefill", [False, True])
def test_split_k_merge_leaves_its_counters_at_zero(prefill):
    """The last piece of each (sequence, KV head, query tile) merges the pieces in the same launch and puts the
    counter back to 0: the layers of a step (and CUDA-graph replays) share one plan's counters. Without the reset
    the second layer would find no last piece and leave its output unwritten."""
    from hf_attn_plugin.kernels import paged as kernels

    lens, new, hq, hkv, d = [90, 200, 3], [1, 1, 1], 4, 2, 16
    if prefill:
        new = [20, 9, 3]
    k_pool, v_pool, bt, seq_lens, _ = _random_paged(lens, hkv, d, 16, torch.float32)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV) if prefill else None
    plan = kernels.Plan((sum(new), hq, d), torch.float32, k_pool.device, k_pool.shape, bt, seq_lens, cu, max(new),
                        None, 4)
    params = AttentionParams(scale=d**-0.5, causal=True, window=0, softcap=0.0, sinks=None)
    for _layer in range(3):
        q = torch.randn(sum(new), hq, d, device=DEV)
        out = plan.run(q, k_pool, v_pool, params)
        ref = paged_attention_reference(q.double(), k_pool.double(), v_pool.double(), bt, seq_lens, cu, None, None,
                                        d**-0.5, True, 0, 0.0)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
        (launch,) = plan.launches.values()
        num_q_tiles = launch.grid[2] // launch.num_splits
        assert launch.num_splits == 4 and launch.done.shape == (len(lens) * hkv * num_q_tiles,)
        assert not launch.done.any()


@needs_kernels
@pytest.mark.parametrize("feat", [{}, {"sinks": True, "k_starts": [0, 3, 2]}, {"window": 500, "softcap": 5.0}])
def test_decode_max_splits_matches_reference(feat):
    """The largest grid (MAX_SPLITS) with one-tile pieces: 64 partials merged per row, vs the reference."""
    from hf_attn_plugin.kernels import paged as kernels
    from hf_attn_plugin.kernels.configs import Config

    config = Config(16, 16, 4, 1, min_split_keys=16, split_programs=10**6)
    pieces = _pieces_per_row([1024, 7, 700], kernels.MAX_SPLITS, hq=2, hkv=1, config=config, **feat)
    assert pieces[1] == 1
    if "window" in feat:  # 500 visible keys: 32 tiles (33 when not aligned)
        assert 32 <= pieces[0] <= 33 and 32 <= pieces[2] <= 33
    else:  # 64 and 44 tiles of 16 keys: one tile each
        assert pieces == [kernels.MAX_SPLITS, 1, 44]


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 4])
def test_prefill_skewed_lengths(num_splits):
    """Chunked prefill over a skewed batch with split-K: query tiles of one sequence split differently."""
    lens, new = [600, 30, 5, 400], [40, 30, 1, 3]
    k_pool, v_pool, bt, seq_lens, _ = _random_paged(lens, 2, 32, 16, torch.float32)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(new), 4, 32, device=DEV)
    _check(q, k_pool, v_pool, bt, seq_lens, cu=cu, max_q=max(new), sinks=_sinks(4), num_splits=num_splits)


PREFILL_CASES = [
    # cached lens (new tokens included), new tokens per sequence, Hq, Hkv, page, splits, dtype, features
    ([12, 40, 7], [12, 40, 7], 4, 2, 16, 1, torch.float32, {}),  # plain prefill
    ([50, 90, 7], [3, 20, 7], 8, 2, 16, 1, torch.float16, {}),  # chunked prefill over cached prefixes
    ([50, 130], [17, 1], 4, 1, 64, 2, torch.float32, {}),  # split-K in prefill; a decode row mixed in
    ([60, 33], [25, 33], 6, 2, 16, 1, torch.float32, {"window": 9}),
    ([60, 33], [25, 0], 4, 2, 16, 1, torch.float32, {"softcap": 2.5, "sinks": True}),  # zero-length query
    ([60, 45], [30, 10], 4, 4, 16, 1, torch.float32, {"k_starts": [8, 30], "window": 20}),
    ([40], [40], 4, 2, 16, 1, torch.float32, {"causal": False}),
]


@needs_kernels
@pytest.mark.parametrize("lens,new,hq,hkv,page,splits,dtype,feat", PREFILL_CASES)
def test_prefill_matches_reference(lens, new, hq, hkv, page, splits, dtype, feat):
    d = 32
    k_pool, v_pool, bt, seq_lens, k_starts = _random_paged(lens, hkv, d, page, dtype, k_starts=feat.get("k_starts"))
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(new), hq, d, device=DEV).to(dtype)
    sinks = _sinks(hq) if feat.get("sinks") else None
    _check(q, k_pool, v_pool, bt, seq_lens, cu=cu, max_q=max(new), k_starts=k_starts, sinks=sinks,
           causal=feat.get("causal", True), window=feat.get("window", 0), softcap=feat.get("softcap", 0.0),
           num_splits=splits)


def test_page_pool_former_name_is_deprecated():
    import hf_attn_plugin.paged as paged

    with pytest.warns(DeprecationWarning, match="PagePool"):
        assert paged.PagedKVCache is PagePool
    with pytest.raises(AttributeError):
        paged.NoSuchName


@needs_kernels
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_one_plan_serves_every_layer_of_a_step(prefill, triton_backend):
    """paged_ops.plan once, run per layer: layers with their own pools and parameters (full / sliding window with
    sinks, as in a mixed model) share the plan's block tables, grid and partial buffers, and each gets exactly the
    answer of its own one-call paged_attention; the plan holds one launch per set of features."""
    lens, hq, hkv, d, page, splits = [5, 37, 70], 8, 2, 32, 16, 3
    new = 4 if prefill else 1
    k0, v0, bt, seq_lens, _ = _random_paged(lens, hkv, d, page, torch.float32)
    # Every layer's pages at the same places (one block table for the step), their own values (NaN stays NaN).
    layers = [(k0 + torch.randn_like(k0), v0 + torch.randn_like(v0)) for _ in range(3)]
    k_starts = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV)
    cu = torch.arange(0, (len(lens) + 1) * new, new, dtype=torch.int32, device=DEV) if prefill else None
    q = torch.randn(len(lens) * new, hq, d, device=DEV)
    sinks = _sinks(hq)
    full, sliding = AttentionParams.create(d), AttentionParams.create(d, window=16, sinks=sinks)
    layer_params = [full, sliding, full]
    step = paged_ops.plan(q, layers[0][0], bt, seq_lens, cu_seqlens_q=cu, max_seqlen_q=new, k_starts=k_starts,
                          num_splits=splits)
    for (k_pool, v_pool), params in zip(layers, layer_params):
        q = torch.randn_like(q)
        out = paged_ops.run(q, k_pool, v_pool, step, params)
        alone = paged_attention(q, k_pool, v_pool, bt, seq_lens, cu_seqlens_q=cu, max_seqlen_q=new, k_starts=k_starts,
                                window=params.window, sinks=params.sinks, num_splits=splits)
        torch.testing.assert_close(out, alone, rtol=0, atol=0)
    assert len(step.kernel.launches) == 2  # (full) and (window + sinks): one launch each
    with pytest.raises(ValueError, match="planned for"):
        paged_ops.run(q[:-1], *layers[0], step, layer_params[0])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_kernel(dtype, triton_backend):
    k_pool = torch.randn(6, 16, 2, 8, device=DEV).to(dtype)
    v_pool = torch.randn_like(k_pool)
    expect_k, expect_v = k_pool.clone(), v_pool.clone()
    slots = torch.tensor([5, -1, 40, 95, 17], device=DEV)
    k_new = torch.randn(5, 2, 8, device=DEV).to(dtype)
    v_new = torch.randn(5, 2, 8, device=DEV).to(dtype)
    write_kv(k_pool, v_pool, k_new, v_new, slots)
    keep = slots >= 0
    expect_k.view(-1, 2, 8)[slots[keep]] = k_new[keep]
    expect_v.view(-1, 2, 8)[slots[keep]] = v_new[keep]
    assert torch.equal(k_pool, expect_k) and torch.equal(v_pool, expect_v)


def _generate_with_cache(backend_env, monkeypatch):
    """Prefill three prompts (one forked twice), then decode steps, against the contiguous reference."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", backend_env)
    hq, hkv, d = 4, 2, 16
    cache = PagePool(1, hkv, d, num_pages=40, page_size=16, max_seqs=8, max_seq_len=128, dtype=torch.float32,
                         device=DEV)
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    seqs = [cache.add_sequence() for _ in range(3)]
    counts = [21, 5, 34]
    for step in range(4):
        if step == 1:  # parallel sampling: fork a partially filled sequence
            seqs.append(cache.fork(seqs[0]))
            history[seqs[-1]] = history[seqs[0]]
        if step > 0:
            counts = [1] * len(seqs)
        plan = cache.plan(seqs, counts)
        total = sum(counts)
        q = torch.randn(total, hq, d, device=DEV)
        k = torch.randn(total, hkv, d, device=DEV)
        v = torch.randn(total, hkv, d, device=DEV)
        write_kv(cache.k_pools[0], cache.v_pools[0], k, v, plan.slot_mapping)
        if plan.is_decode:
            out = paged_attention(q, cache.k_pools[0], cache.v_pools[0], plan.block_tables, plan.seq_lens,
                                  window=20, num_splits=2)
        else:
            out = paged_attention(q, cache.k_pools[0], cache.v_pools[0], plan.block_tables, plan.seq_lens,
                                  cu_seqlens_q=plan.cu_seqlens_q, max_seqlen_q=plan.max_seqlen_q, window=20)
        offsets = plan.cu_seqlens_q.tolist()
        for i, sid in enumerate(seqs):
            sl = slice(offsets[i], offsets[i + 1])
            pk, pv = history.get(sid, (k[:0], v[:0]))
            history[sid] = (torch.cat([pk, k[sl]]), torch.cat([pv, v[sl]]))
            ref, _ = reference.attention_reference(q[sl][None], history[sid][0][None], history[sid][1][None],
                                                   window=20)
            torch.testing.assert_close(out[sl], ref[0], atol=1e-5, rtol=1e-5)
    cache.check_invariants()
    for sid in seqs:
        cache.free(sid)
    assert cache.num_free_pages == cache.num_pages


def test_cache_end_to_end_reference_backend(monkeypatch):
    _generate_with_cache("reference", monkeypatch)


@needs_kernels
def test_cache_end_to_end_triton_backend(monkeypatch):
    _generate_with_cache("triton", monkeypatch)


def test_ops_opcheck_and_fake(reference_backend):
    k_pool, v_pool, bt, seq_lens, _ = _random_paged([10, 20], 2, 8, 16, torch.float32)
    k_pool, v_pool = k_pool.nan_to_num(0.0), v_pool.nan_to_num(0.0)
    q = torch.randn(2, 4, 8, device=DEV)
    args = (q, k_pool, v_pool, bt, seq_lens, None, None, None, 8**-0.5, True, 0, 0.0, 1, 1)
    torch.library.opcheck(torch.ops.hf_attn_plugin.paged_attention.default, args)
    slots = torch.tensor([3, 17], device=DEV)
    kv = torch.randn(2, 2, 8, device=DEV)
    torch.library.opcheck(torch.ops.hf_attn_plugin.paged_write_kv.default, (k_pool, v_pool, kv, kv.clone(), slots))


def test_api_rejects_bad_inputs():
    k_pool = torch.zeros(4, 16, 2, 8)
    q = torch.zeros(3, 4, 8)
    bt = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_attention(q, k_pool, k_pool, bt, torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q[:2], k_pool, k_pool, bt.long(), torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="GQA"):
        paged_attention(torch.zeros(2, 3, 8), k_pool, k_pool, bt, torch.ones(2, dtype=torch.int32))


# =========================================================================== GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("feat", [{}, {"window": 1000, "sinks": True}, {"softcap": 30.0, "k_starts": True}])
def test_gpu_decode_bf16_large(num_splits, feat):
    lens = [1, 17, 300, 4096, 8191, 2000, 6000, 5]
    starts = [0, 3, 100, 0, 4000, 7, 0, 0] if feat.get("k_starts") else None
    k_pool, v_pool, bt, seq_lens, k_starts = _random_paged(lens, 8, 128, 16, torch.bfloat16, k_starts=starts)
    q = torch.randn(len(lens), 32, 128, device=DEV, dtype=torch.bfloat16)
    sinks = _sinks(32) if feat.get("sinks") else None
    out = paged_attention(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts, sinks=sinks,
                          window=feat.get("window"), softcap=feat.get("softcap"), num_splits=num_splits)
    scale = 128**-0.5
    ref = paged_attention_reference(q.double(), k_pool.double(), v_pool.double(), bt, seq_lens, None, k_starts,
                                    sinks.double() if sinks is not None else None, scale, True,
                                    feat.get("window", 0), feat.get("softcap", 0.0))
    base = _torch_in_dtype(q, k_pool, v_pool, bt, seq_lens, None, k_starts, sinks, scale, True,
                           feat.get("window", 0), feat.get("softcap", 0.0))
    assert torch.isfinite(out).all()
    assert_fa2_rule(out, ref, base)


@pytest.mark.gpu
def test_gpu_default_split_skewed_vs_uniform():
    """Default grid and piece rule on the GPU: a skewed batch cuts its long sequences, a uniform one stays whole."""
    gen = torch.Generator().manual_seed(0)
    skewed = [32768, 8192] + torch.randint(128, 2048, (30,), generator=gen).tolist()
    pieces = _pieces_per_row(skewed, 0, hq=32, hkv=8, d=128)
    assert pieces[0] > pieces[1] > 1 and max(pieces[2:]) == 1
    assert _pieces_per_row([2048] * 64, 0, hq=32, hkv=8, d=128) == [1] * 64


@pytest.mark.gpu
def test_gpu_default_split_fills_the_gpu_at_small_batch():
    """Llama-1B heads (32/8, D=64), default grid: B=1 cuts its cache into 128-key pieces or more
    (576 keys: 9 tiles -> 3 pieces of 3), enough for one program per SM at 4k; B=64 x 4k stays whole."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert _pieces_per_row([576], 0, hq=32, hkv=8, d=64) == [3]
    pieces_4k = _pieces_per_row([4096], 0, hq=32, hkv=8, d=64)[0]
    assert pieces_4k == 32 and 8 * pieces_4k >= sms
    assert _pieces_per_row([4096] * 64, 0, hq=32, hkv=8, d=64) == [1] * 64


@pytest.mark.gpu
@pytest.mark.parametrize("lens,num_splits", [([32768], 0), ([5000, 70, 3000, 1], 64)], ids=["b1_32k", "skewed"])
def test_gpu_split_k_merge_is_deterministic(lens, num_splits):
    """Whichever piece finishes last merges all of them in split order: 30 calls (eager and replayed from a CUDA
    graph) give the same bits, and the result matches the reference."""
    k_pool, v_pool, bt, seq_lens, _ = _random_paged(lens, 8, 64, 16, torch.bfloat16)
    q = torch.randn(len(lens), 32, 64, device=DEV, dtype=torch.bfloat16)
    sinks = _sinks(32)

    def step():
        return paged_attention(q, k_pool, v_pool, bt, seq_lens, sinks=sinks, num_splits=num_splits or None)

    first = step()
    assert max(_pieces_per_row(lens, num_splits, hq=32, hkv=8, d=64)) > 16
    for _ in range(10):
        assert torch.equal(step(), first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(20):
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    ref = paged_attention_reference(q.double(), k_pool.double(), v_pool.double(), bt, seq_lens, None, None,
                                    sinks.double(), 64**-0.5, True, 0, 0.0)
    assert (first.double() - ref).abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("d,hq,hkv", [(128, 32, 8), (64, 16, 16), (256, 8, 2)])
@pytest.mark.parametrize("feat", [{}, {"window": 100, "sinks": True, "softcap": 20.0}])
def test_gpu_prefill_bf16(d, hq, hkv, feat):
    lens, new = [700, 1500, 64, 3000], [700, 333, 1, 1024]
    k_pool, v_pool, bt, seq_lens, _ = _random_paged(lens, hkv, d, 16, torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(new), hq, d, device=DEV, dtype=torch.bfloat16)
    sinks = _sinks(hq) if feat.get("sinks") else None
    _check(q, k_pool, v_pool, bt, seq_lens, cu=cu, max_q=max(new), sinks=sinks, window=feat.get("window", 0),
           softcap=feat.get("softcap", 0.0))


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_capture_and_replay():
    batch, hq, hkv, d, page, width = 8, 32, 8, 128, 16, 64
    num_pages = batch * width
    k_pool = torch.randn(num_pages, page, hkv, d, device=DEV, dtype=torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    bt = torch.randperm(num_pages, device=DEV).int().view(batch, width)
    seq_lens = torch.randint(1, width * page, (batch,), device=DEV, dtype=torch.int32)
    q = torch.randn(batch, hq, d, device=DEV, dtype=torch.bfloat16)
    sinks = _sinks(hq)

    def step():
        return paged_attention(q, k_pool, v_pool, bt, seq_lens, sinks=sinks, num_splits=4)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):  # new lengths, tables and queries in the same buffers
        seq_lens.copy_(torch.randint(0, width * page, (batch,), device=DEV, dtype=torch.int32))
        bt.copy_(torch.randperm(num_pages, device=DEV).int().view(batch, width))
        q.copy_(torch.randn_like(q))
        out.fill_(math.nan)
        graph.replay()
        ref = paged_attention_reference(q.double(), k_pool.double(), v_pool.double(), bt, seq_lens, None, None,
                                        sinks.double(), d**-0.5, True, 0, 0.0)
        assert torch.isfinite(out).all()
        assert (out.double() - ref).abs().max().item() < 2e-2


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    k_pool, v_pool, bt, seq_lens, _ = _random_paged([100, 900], 8, 128, 16, torch.bfloat16)
    k_pool, v_pool = k_pool.nan_to_num(0.0), v_pool.nan_to_num(0.0)
    q = torch.randn(2, 32, 128, device=DEV, dtype=torch.bfloat16)
    k_new = torch.randn(2, 8, 128, device=DEV, dtype=torch.bfloat16)
    slots = torch.tensor([bt[0, 6].item() * 16 + 3, bt[1, 56].item() * 16 + 3], device=DEV)

    def step(q, k_new):
        write_kv(k_pool, v_pool, k_new, k_new, slots)
        return paged_attention(q, k_pool, v_pool, bt, seq_lens)

    expect = step(q, k_new)
    got = torch.compile(step, fullgraph=True)(q, k_new)
    torch.testing.assert_close(got, expect)


# --------------------------------------------------------------------------- what ptxas gets (sm_90, no GPU needed)
def _sm90_shared_bytes(page_size: int, config: str, dim: int = 64) -> int:
    """Shared memory of the paged decode kernel compiled for sm_90 (benchmarks/compile_flash.py, in a process without
    the interpreter: Triton's real compiler and the ptxas it ships)."""
    import re
    import subprocess
    import sys

    from .helpers import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "benchmarks/compile_flash.py", "--kind", "paged_decode", "--dim",
                             str(dim), "--seqlen", "1024", "--page-size", str(page_size), "--configs", config],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = re.search(r"\| _paged_attention_kernel #1 \| \d+ \| [^|]+ \| (\d+) \|", result.stdout)
    assert row, result.stdout
    return int(row.group(1))


def _ptxas_ships():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001  (no NVIDIA backend in this Triton build)
        return False


@pytest.mark.skipif(not _ptxas_ships(), reason="this Triton build has no NVIDIA backend/ptxas to compile for sm_90")
@pytest.mark.parametrize("page_size", [0, 16], ids=["computed_pages", "block_table"])
def test_decode_kernel_multi_buffers_kv_at_three_stages(page_size):
    """At 3 pipeline stages the decode kernel keeps two K/V tiles in flight (2 x [64 keys, 64] K + V, bf16: 32 KiB of
    shared memory). Before, the K/V addresses waited on a block-table load of their own iteration and Triton kept one
    buffer at any stage count (20.7 KB): the decode route's cache streamed at 0.44 of copy bandwidth at B=1 x 32k."""
    two_buffers = 2 * 2 * 64 * 64 * 2
    assert _sm90_shared_bytes(page_size, "16,64,4,3") >= two_buffers
    assert _sm90_shared_bytes(page_size, "16,64,4,2") < two_buffers  # 2 stages: one buffer (the decode default)
