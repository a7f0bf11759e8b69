"""Paged KV cache under bad input: the allocator's sequence ids, and every public entry point of
``hf_attn_plugin.paged`` / ``hf_attn_plugin.paged_ops`` given wrong dtypes, shapes, devices and out-of-range
indices. Each must raise a clear error or return the reference's answer: never crash (the Triton interpreter
segfaults on an out-of-range index; a GPU reports an illegal memory access or silently corrupts the cache).
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit: the interpreter is chosen there
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_attn_plugin import _checks, paged_ops  # noqa: E402
from hf_attn_plugin.paged import (  # noqa: E402
    BlockAllocator,
    OutOfSequenceSlotsError,
    PagedCacheError,
    PagePool,
    SequenceTooLongError,
    UnknownSequenceError,
    bytes_per_page,
    num_pages_for_budget,
)
from hf_attn_plugin.paged_ops import gather_kv, paged_attention, paged_attention_reference, write_kv  # noqa: E402

from .helpers import DEVICE as DEV, needs_kernels  # noqa: E402

BACKENDS = ["reference", pytest.param("triton", marks=needs_kernels)]


# On a GPU the default checks are device-side asserts, which end the process: in-process tests there use "full"
# (host checks, ValueError); test_gpu_device_side_assert_fires covers the default in subprocesses.
GPU_CHECKS = "full" if DEV == "cuda" else "1"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", request.param)
    monkeypatch.setenv(_checks.ENV, GPU_CHECKS)
    return request.param


def _cache(num_pages=16, page_size=4, max_seqs=4, max_seq_len=32, **kw):
    return PagePool(1, 1, 2, num_pages=num_pages, page_size=page_size, max_seqs=max_seqs,
                        max_seq_len=max_seq_len, dtype=torch.float32, **kw)


# =========================================================================== allocator: sequence ids
def test_free_of_a_stale_id_leaves_the_new_sequence_alone():
    cache = _cache()
    a = cache.add_sequence()
    cache.append_slots(a, 5)
    cache.free(a)
    b = cache.add_sequence()  # takes a's block-table row, not its id
    cache.append_slots(b, 6)
    assert b != a
    with pytest.raises(UnknownSequenceError, match=f"sequence {a} was freed"):
        cache.free(a)
    assert cache.seq_len(b) == 6 and len(cache.pages(b)) == 2 and cache.seq_ids == [b]
    cache.check_invariants()


def test_fork_of_a_freed_id_raises_and_leaks_nothing():
    cache = _cache(max_seqs=2)
    a = cache.add_sequence()
    cache.append_slots(a, 5)
    cache.free(a)
    with pytest.raises(UnknownSequenceError, match="freed"):
        cache.fork(a)
    with pytest.raises(UnknownSequenceError, match="does not exist"):
        cache.fork(12345)
    assert cache.seq_ids == []
    b, c = cache.add_sequence(), cache.add_sequence()  # both rows are still free: the failed forks leaked none
    with pytest.raises(OutOfSequenceSlotsError):
        cache.fork(b)  # no row left: nothing changes
    assert cache.seq_ids == [b, c]
    cache.check_invariants()


@pytest.mark.parametrize("method,args", [("seq_len", ()), ("pages", ()), ("block_table", ()), ("row", ()),
                                         ("append_slots", (1,)), ("pages_needed", (1,)), ("can_append", (1,))])
def test_every_method_refuses_a_dead_id(method, args):
    cache = _cache()
    a = cache.add_sequence()
    cache.free(a)
    cache.add_sequence()
    with pytest.raises(UnknownSequenceError, match=f"sequence {a} was freed"):
        getattr(cache, method)(a, *args)
    with pytest.raises(UnknownSequenceError, match="does not exist"):
        getattr(cache, method)(-1, *args)
    with pytest.raises(TypeError, match="seq_id must be an integer"):
        getattr(cache, method)("0", *args)
    cache.check_invariants()


def test_plan_refuses_negative_and_fractional_lengths_changing_nothing():
    cache = _cache()
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append_slots(a, 3)
    for bad, err in (([2, -1], ValueError), ([2, 1.5], TypeError), ([2, "1"], TypeError)):
        with pytest.raises(err, match="num_new_tokens"):
            cache.plan([a, b], bad)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        cache.append_slots(a, -2)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        cache.can_append(a, -2)
    with pytest.raises(ValueError, match="2 seq_ids but 1"):
        cache.plan([a, b], [1])
    assert cache.seq_len(a) == 3 and cache.seq_len(b) == 0
    plan = cache.plan([a, b], [torch.tensor(2), 0])  # integer tensors are fine, 0 new tokens too
    assert plan.cu_seqlens_q.tolist() == [0, 2, 2] and plan.seq_lens.tolist() == [5, 0]
    cache.check_invariants()


def test_plan_is_all_or_nothing_when_a_sequence_grows_too_long():
    cache = _cache(max_seq_len=8)
    a, b = cache.add_sequence(), cache.add_sequence()
    with pytest.raises(SequenceTooLongError):
        cache.plan([a, b], [2, 9])
    assert cache.seq_len(a) == 0 and cache.num_free_pages == 16  # a was not grown before b failed
    cache.check_invariants()


def test_plan_uses_rows_not_ids():
    """After ids and rows part ways (a freed row reused by a new id), plans still point at the right pages."""
    cache = _cache()
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append_slots(a, 5)
    cache.append_slots(b, 9)
    cache.free(a)
    c = cache.add_sequence()
    cache.append_slots(c, 2)
    plan = cache.plan([b, c], [1, 1])
    assert plan.block_tables[0, :3].tolist() == cache.pages(b) and plan.block_tables[1, :1].tolist() == cache.pages(c)
    assert plan.slot_mapping.tolist() == [cache.pages(b)[2] * 4 + 1, cache.pages(c)[0] * 4 + 2]
    cache.check_invariants()


@pytest.mark.parametrize("kwargs,err,match", [
    ({"num_pages": 0}, ValueError, "num_pages must be >= 1"),
    ({"num_pages": -3}, ValueError, "num_pages must be >= 1"),
    ({"num_pages": 2.5}, TypeError, "num_pages must be an integer"),
    ({"page_size": 0}, ValueError, "page_size must be >= 1"),
    ({"page_size": 6}, ValueError, "power of two"),
    ({"page_size": 16.0}, TypeError, "page_size must be an integer"),
    ({"max_seqs": 0}, ValueError, "max_seqs must be >= 1"),
    ({"max_seq_len": 0}, ValueError, "max_seq_len must be >= 1"),
    ({"max_seq_len": None, "max_pages_per_seq": -1}, ValueError, "max_pages_per_seq must be >= 1"),
    ({"num_layers": 0}, ValueError, "num_layers must be >= 1"),
    ({"num_kv_heads": -1}, ValueError, "num_kv_heads must be >= 1"),
    ({"head_dim": 0}, ValueError, "head_dim must be >= 1"),
    ({"dtype": torch.int32}, TypeError, "floating"),
    ({"dtype": "bfloat16"}, TypeError, "floating"),
    ({"num_pages": None, "memory_gib": 1e-9}, ValueError, "holds no page"),
    ({"num_pages": None, "memory_gib": -1.0}, ValueError, "memory_gib"),
    ({"num_pages": None, "memory_gib": math.nan}, ValueError, "memory_gib"),
    ({"num_pages": None, "memory_gib": math.inf}, ValueError, "memory_gib"),
    ({"num_pages": None}, ValueError, "exactly one"),
])
def test_cache_constructor_refuses_bad_sizes(kwargs, err, match):
    args = dict(num_layers=1, num_kv_heads=1, head_dim=2, num_pages=4, page_size=4, max_seqs=2, max_seq_len=16,
                dtype=torch.float32)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        PagePool(args.pop("num_layers"), args.pop("num_kv_heads"), args.pop("head_dim"), **args)


def test_sizing_helpers_refuse_bad_sizes():
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        bytes_per_page(1, 1, 8, 0, torch.float16)
    with pytest.raises(ValueError, match="memory_gib"):
        num_pages_for_budget(-1.0, num_layers=1, num_kv_heads=1, head_dim=8)


def test_block_allocator_refuses_bad_pages_all_or_nothing():
    alloc = BlockAllocator(4)
    with pytest.raises(ValueError, match="n must be >= 0"):
        alloc.allocate(-1)
    (p,) = alloc.allocate(1)
    for bad in ([-1], [4], [p, 99]):  # -1 would be the last page through Python's negative indexing
        with pytest.raises(ValueError, match="does not exist"):
            alloc.decref(bad)
        with pytest.raises(ValueError, match="does not exist"):
            alloc.incref(bad)
    with pytest.raises(PagedCacheError, match="freed more often"):
        alloc.decref([p, p])
    with pytest.raises(PagedCacheError, match="not allocated"):
        alloc.incref([p, 3])
    assert alloc.refcount(p) == 1 and alloc.num_free == 3  # nothing changed
    with pytest.raises(ValueError, match="does not exist"):
        alloc.refcount(-1)
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        BlockAllocator(0)


# =========================================================================== ops: inputs
def _setup(lens=(5, 11), hq=4, hkv=2, d=16, page=4, num_pages=8, width=4):
    """Pools and a valid block table for ``lens`` (pages laid out in order), one decode query per sequence."""
    gen = torch.Generator().manual_seed(0)
    k_pool = torch.randn(num_pages, page, hkv, d, generator=gen).to(DEV)
    v_pool = torch.randn(num_pages, page, hkv, d, generator=gen).to(DEV)
    bt = torch.zeros(len(lens), width, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(lens):
        c = -(-n // page)
        bt[b, :c] = torch.arange(nxt, nxt + c)
        nxt += c
    q = torch.randn(len(lens), hq, d, generator=gen).to(DEV)
    return q, k_pool, v_pool, bt.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def _reference(q, k_pool, v_pool, bt, seq_lens, cu=None, k_starts=None, window=0):
    return paged_attention_reference(q, k_pool, v_pool, bt, seq_lens, cu, k_starts, None, q.shape[-1] ** -0.5, True,
                                     window, 0.0)


def test_write_kv_refuses_slots_past_the_pools(backend):
    k_pool = torch.zeros(3, 4, 2, 8, device=DEV)
    v_pool = torch.zeros_like(k_pool)
    kv = torch.ones(3, 2, 8, device=DEV)
    for slots in ([0, 12, -1], [2**40, 1, 2]):  # 12 = 3 pages * 4: one past the last slot
        with pytest.raises(ValueError, match="slot_mapping has a slot >= 12"):
            write_kv(k_pool, v_pool, kv, kv, torch.tensor(slots, device=DEV))
    assert not k_pool.any() and not v_pool.any()  # nothing was written
    write_kv(k_pool, v_pool, kv, kv, torch.tensor([11, -1, -7], dtype=torch.int32, device=DEV))  # negatives skip
    assert k_pool[2, 3].eq(1).all() and k_pool.sum() == 16


@pytest.mark.parametrize("case,match", [
    ("slots_float", "slot_mapping must be torch.int64 or torch.int32"),
    ("slots_2d", r"slot_mapping must be \[3\]"),
    ("slots_short", r"slot_mapping must be \[3\]"),
    ("kv_int", "floating point"),
    ("kv_shape", "do not match"),
    ("k_v_differ", "must both be"),
    ("pool_int", "floating dtype"),
    ("pools_differ", "must both be"),
    ("page_size_0", "page_size, H_kv and D >= 1"),
    ("pool_transposed", "contiguous"),
    ("device", "slot_mapping is on meta"),
])
def test_write_kv_refuses_bad_arguments(backend, case, match):
    k_pool = torch.zeros(3, 4, 2, 8, device=DEV)
    v_pool = torch.zeros_like(k_pool)
    kv = torch.ones(3, 2, 8, device=DEV)
    args = dict(k_pool=k_pool, v_pool=v_pool, k_new=kv, v_new=kv.clone(), slot_mapping=torch.arange(3, device=DEV))
    if case == "slots_float":
        args["slot_mapping"] = args["slot_mapping"].float()
    elif case == "slots_2d":
        args["slot_mapping"] = args["slot_mapping"][None]
    elif case == "slots_short":
        args["slot_mapping"] = args["slot_mapping"][:2]
    elif case == "kv_int":
        args["k_new"] = args["v_new"] = kv.int()
    elif case == "kv_shape":
        args["k_new"] = args["v_new"] = torch.ones(3, 2, 4, device=DEV)
    elif case == "k_v_differ":
        args["v_new"] = kv[:2]
    elif case == "pool_int":
        args["k_pool"] = args["v_pool"] = k_pool.int()
    elif case == "pools_differ":
        args["v_pool"] = k_pool[:2]
    elif case == "page_size_0":
        args["k_pool"] = args["v_pool"] = torch.zeros(3, 0, 2, 8, device=DEV)
    elif case == "pool_transposed":
        args["k_pool"] = args["v_pool"] = torch.zeros(3, 4, 8, 2, device=DEV).transpose(2, 3)
    elif case == "device":
        args["slot_mapping"] = args["slot_mapping"].to("meta")
    with pytest.raises(ValueError, match=match):
        write_kv(**args)
    assert not k_pool.any()


def test_write_kv_noncontiguous_slots_and_pools(backend):
    """Strided slot mappings and pools (a page slice of a larger pool) write where they say."""
    big = torch.zeros(6, 4, 2, 8, device=DEV)
    k_pool, v_pool = big[::2], torch.zeros(3, 4, 2, 8, device=DEV)  # every other page: not contiguous
    kv = torch.arange(3 * 16, dtype=torch.float32, device=DEV).view(3, 2, 8)
    slots = torch.tensor([1, 99, 5, 99, 10, 99], device=DEV)[::2]
    write_kv(k_pool, v_pool, kv, -kv, slots)
    assert torch.equal(k_pool[0, 1], kv[0]) and torch.equal(k_pool[1, 1], kv[1]) and torch.equal(k_pool[2, 2], kv[2])
    assert torch.equal(v_pool[2, 2], -kv[2]) and big[1].eq(0).all()


@pytest.mark.parametrize("case,match", [
    ("table_entry", r"block_tables entry within seq_lens is not a page in \[0, 8\)"),
    ("table_negative", r"block_tables entry within seq_lens is not a page"),
    ("len_past_table", r"seq_lens must be in \[0, 16\]"),
    ("len_negative", r"seq_lens must be in \[0, 16\]"),
    ("k_starts_negative", "k_starts must be >= 0"),
])
def test_paged_attention_refuses_out_of_range_indices(backend, case, match):
    q, k_pool, v_pool, bt, seq_lens = _setup()
    k_starts = None
    if case == "table_entry":
        bt[1, 2] = 8
    elif case == "table_negative":
        bt[0, 1] = -1
    elif case == "len_past_table":
        seq_lens[1] = 17
    elif case == "len_negative":
        seq_lens[0] = -1
    elif case == "k_starts_negative":
        k_starts = torch.tensor([0, -4], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=match):
        paged_attention(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts)


def test_table_entries_past_seq_lens_are_padding(backend):
    """Entries the lengths do not reach are never read: any value there is fine."""
    q, k_pool, v_pool, bt, seq_lens = _setup()
    bt[0, 2:] = -5
    bt[1, 3] = 10**6
    out = paged_attention(q, k_pool, v_pool, bt, seq_lens, num_splits=1)
    torch.testing.assert_close(out, _reference(q, k_pool, v_pool, bt, seq_lens))


@pytest.mark.parametrize("case,match", [
    ("cu_start", "must start at 0 and end at q's token count 6"),
    ("cu_end", "must start at 0 and end at q's token count 6"),
    ("cu_past_q", "must start at 0 and end at q's token count 6"),
    ("cu_decreasing", "non-decreasing"),
    ("max_q_small", "more than max_seqlen_q=2 query tokens"),
])
def test_paged_attention_refuses_bad_cu_seqlens_q(backend, case, match):
    _, k_pool, v_pool, bt, seq_lens = _setup()
    q = torch.randn(6, 4, 16, device=DEV)
    cu, max_q = [0, 2, 6], 4
    if case == "cu_start":
        cu = [1, 2, 6]
    elif case == "cu_end":
        cu = [0, 2, 5]
    elif case == "cu_past_q":
        cu = [0, 2, 9]
    elif case == "cu_decreasing":
        cu = [0, 7, 6]
    elif case == "max_q_small":
        max_q = 2
    cu = torch.tensor(cu, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=match):
        paged_attention(q, k_pool, v_pool, bt, seq_lens, cu_seqlens_q=cu, max_seqlen_q=max_q)
    if case != "max_q_small":  # the same check when the length is read back from cu_seqlens_q (a sync)
        with pytest.raises(ValueError, match=match):
            paged_attention(q, k_pool, v_pool, bt, seq_lens, cu_seqlens_q=cu)


@pytest.mark.parametrize("case,match", [
    ("q_int", "dtypes differ"),
    ("q_2d", r"q must be \[T, Hq, D\]"),
    ("hkv_0", "page_size, H_kv and D >= 1"),
    ("head_dim", "does not fit pools"),
    ("gqa", "GQA grouping"),
    ("table_int64", "block_tables must be torch.int32"),
    ("lens_int64", "seq_lens must be torch.int32"),
    ("table_rows", r"block_tables must be \[2, \*\]"),
    ("lens_2d", r"seq_lens must be \[\*\]"),
    ("decode_count", "one query per sequence"),
    ("cu_shape", r"cu_seqlens_q must be \[3\]"),
    ("k_starts_shape", r"k_starts must be \[2\]"),
    ("k_starts_int64", "k_starts must be torch.int32"),
    ("sinks_shape", r"sinks must be floating \[Hq=4\]"),
    ("sinks_int", r"sinks must be floating \[Hq=4\]"),
    ("device", "seq_lens is on meta"),
    ("window_negative", "window must be >= 0"),
    ("window_fraction", "window must be an integer"),
    ("softcap_negative", "softcap must be a finite number >= 0"),
    ("softcap_nan", "softcap must be a finite number >= 0"),
    ("splits_negative", "num_splits must be >= 0"),
    ("max_q_negative", "max_seqlen_q must be >= 0"),
])
def test_paged_attention_refuses_bad_arguments(backend, case, match):
    q, k_pool, v_pool, bt, seq_lens = _setup()
    kw = {}
    if case == "q_int":
        q = q.int()
    elif case == "q_2d":
        q = q[0]
    elif case == "hkv_0":
        k_pool = v_pool = torch.zeros(8, 4, 0, 16, device=DEV)
    elif case == "head_dim":
        q = torch.randn(2, 4, 32, device=DEV)
    elif case == "gqa":
        q = torch.randn(2, 3, 16, device=DEV)
    elif case == "table_int64":
        bt = bt.long()
    elif case == "lens_int64":
        seq_lens = seq_lens.long()
    elif case == "table_rows":
        bt = bt[:1]
    elif case == "lens_2d":
        seq_lens = seq_lens[None]
    elif case == "decode_count":
        q = torch.randn(3, 4, 16, device=DEV)
    elif case == "cu_shape":
        kw["cu_seqlens_q"] = torch.tensor([0, 2], dtype=torch.int32, device=DEV)
    elif case == "k_starts_shape":
        kw["k_starts"] = torch.zeros(3, dtype=torch.int32, device=DEV)
    elif case == "k_starts_int64":
        kw["k_starts"] = torch.zeros(2, dtype=torch.int64, device=DEV)
    elif case == "sinks_shape":
        kw["sinks"] = torch.zeros(2, device=DEV)
    elif case == "sinks_int":
        kw["sinks"] = torch.zeros(4, dtype=torch.int32, device=DEV)
    elif case == "device":
        seq_lens = seq_lens.to("meta")
    elif case == "window_negative":
        kw["window"] = -3
    elif case == "window_fraction":
        kw["window"] = 2.7
    elif case == "softcap_negative":
        kw["softcap"] = -1.0
    elif case == "softcap_nan":
        kw["softcap"] = math.nan
    elif case == "splits_negative":
        kw["num_splits"] = -2
    elif case == "max_q_negative":
        kw["cu_seqlens_q"] = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
        kw["max_seqlen_q"] = -1
    with pytest.raises(ValueError, match=match):
        paged_attention(q, k_pool, v_pool, bt, seq_lens, **kw)


def test_noncontiguous_index_tensors_give_the_reference_answer(backend):
    """The kernels read index tensors with unit stride: strided ones must be made contiguous first."""
    q, k_pool, v_pool, bt, seq_lens = _setup(lens=(5, 11, 2))
    expect = _reference(q, k_pool, v_pool, bt, seq_lens, k_starts=torch.tensor([1, 3, 0], dtype=torch.int32))
    lens_strided = torch.stack([seq_lens, torch.full_like(seq_lens, 10**6)], 1)[:, 0]
    bt_strided = bt.t().contiguous().t()
    starts_strided = torch.tensor([1, -9, 3, -9, 0, -9], dtype=torch.int32, device=DEV)[::2]
    assert not (lens_strided.is_contiguous() or bt_strided.is_contiguous() or starts_strided.is_contiguous())
    out = paged_attention(q, k_pool, v_pool, bt_strided, lens_strided, k_starts=starts_strided, num_splits=1)
    torch.testing.assert_close(out, expect)
    cu = torch.tensor([0, 9, 1, 9, 2, 9, 3], dtype=torch.int32, device=DEV)[::2]
    out = paged_attention(q, k_pool, v_pool, bt_strided, lens_strided, cu_seqlens_q=cu, max_seqlen_q=1,
                          k_starts=starts_strided)
    torch.testing.assert_close(out, expect)


def test_edge_values_give_the_reference_answer(backend):
    """Empty sequences, k_starts past the length, more new tokens than cached ones; a window of 3.0 is refused
    (as hf_attn_plugin.attention refuses it: one integer rule for both)."""
    q, k_pool, v_pool, bt, seq_lens = _setup(lens=(0, 11, 3))
    k_starts = torch.tensor([0, 11, 1], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="window must be an integer, got 3.0"):
        paged_attention(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts, window=3.0)
    out = paged_attention(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts, window=3)
    torch.testing.assert_close(out, _reference(q, k_pool, v_pool, bt, seq_lens, k_starts=k_starts, window=3))
    assert out[:2].eq(0).all()  # nothing to attend to
    qs = torch.randn(7, 4, 16, device=DEV)
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32, device=DEV)  # sequence 2: 5 new tokens, 3 cached
    out = paged_attention(qs, k_pool, v_pool, bt, seq_lens, cu_seqlens_q=cu)
    torch.testing.assert_close(out, _reference(qs, k_pool, v_pool, bt, seq_lens, cu=cu))
    big = paged_attention(qs, k_pool, v_pool, bt, seq_lens, cu_seqlens_q=cu, max_seqlen_q=10**12)  # a loose bound
    torch.testing.assert_close(big, out)  # (it sized the grid: ~1e12 idle programs, a hang on the interpreter)
    empty = paged_attention(q[:0], k_pool, v_pool, bt[:0], seq_lens[:0])
    assert empty.shape == (0, 4, 16)


@needs_kernels
def test_triton_backend_refuses_unsupported_dtypes(monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q, k_pool, v_pool, bt, seq_lens = _setup()
    with pytest.raises(ValueError, match="float16, bfloat16 or float32, got torch.float64"):
        paged_attention(q.double(), k_pool.double(), v_pool.double(), bt, seq_lens)
    if DEV == "cpu":  # the interpreter's bf16 tl.dot is wrong (errors ~1e8 without this refusal)
        with pytest.raises(ValueError, match="bfloat16 on the Triton interpreter"):
            paged_attention(q.bfloat16(), k_pool.bfloat16(), v_pool.bfloat16(), bt, seq_lens)


def test_plan_under_inference_mode(backend):
    """Plans made under inference mode (inference tensors have no version counter) stay trusted and work."""
    cache = PagePool(1, 2, 16, num_pages=8, page_size=4, max_seqs=4, max_seq_len=32, dtype=torch.float32,
                         device=DEV)
    with torch.inference_mode():
        sid = cache.add_sequence()
        plan = cache.plan([sid], [3])
        kv = torch.randn(3, 2, 16, device=DEV)
        write_kv(cache.k_pools[0], cache.v_pools[0], kv, kv, plan.slot_mapping)
        q = torch.randn(3, 4, 16, device=DEV)
        out = paged_attention(q, cache.k_pools[0], cache.v_pools[0], plan.block_tables, plan.seq_lens,
                              cu_seqlens_q=plan.cu_seqlens_q, max_seqlen_q=plan.max_seqlen_q)
        expect = _reference(q, cache.k_pools[0], cache.v_pools[0], plan.block_tables, plan.seq_lens,
                            cu=plan.cu_seqlens_q)
    torch.testing.assert_close(out, expect)


def test_gather_kv_refuses_bad_input():
    pool = torch.randn(3, 4, 1, 2)
    bt = torch.tensor([2, 0, 7], dtype=torch.int32)
    assert torch.equal(gather_kv(pool, bt, 6)[0], torch.cat([pool[2], pool[0]])[:6])
    with pytest.raises(ValueError, match=r"not all pages in \[0, 3\)"):
        gather_kv(pool, bt, 9)
    with pytest.raises(ValueError, match="do not fit"):
        gather_kv(pool, bt, 13)
    with pytest.raises(ValueError, match="length must be >= 0"):
        gather_kv(pool, bt, -1)
    with pytest.raises(ValueError, match="integer row"):
        gather_kv(pool, bt.float(), 4)


# =========================================================================== HF_ATTN_PLUGIN_CHECKS and built tensors
class _Spy:
    """Counts the value conditions the ops hand to ``require``."""

    def __init__(self, monkeypatch):
        self.conditions = 0
        real = paged_ops.require

        def spy(conds, *, host):
            self.conditions += len(conds)
            real(conds, host=host)

        monkeypatch.setattr(paged_ops, "require", spy)


def test_plan_tensors_skip_the_value_checks(backend, monkeypatch):
    """The decode hot path through the allocator's plan costs no device-side check at all."""
    monkeypatch.setenv(_checks.ENV, "1")
    cache = PagePool(1, 2, 16, num_pages=8, page_size=4, max_seqs=4, max_seq_len=32, dtype=torch.float32,
                         device=DEV)
    seqs = [cache.add_sequence() for _ in range(2)]
    spy = _Spy(monkeypatch)
    for counts in ([5, 3], [1, 1]):
        plan = cache.plan(seqs, counts)
        kv = torch.randn(sum(counts), 2, 16, device=DEV)
        write_kv(cache.k_pools[0], cache.v_pools[0], kv, kv, plan.slot_mapping)
        q = torch.randn(sum(counts), 4, 16, device=DEV)
        cu = None if plan.is_decode else plan.cu_seqlens_q
        paged_attention(q, cache.k_pools[0], cache.v_pools[0], plan.block_tables, plan.seq_lens, cu_seqlens_q=cu,
                        max_seqlen_q=plan.max_seqlen_q)
    assert spy.conditions == 0
    # a user-made tensor is checked
    paged_attention(q, cache.k_pools[0], cache.v_pools[0], plan.block_tables.clone(), plan.seq_lens)
    assert spy.conditions > 0


def test_paged_cache_decode_steps_check_nothing(reference_backend, monkeypatch):
    """generate() with a PagedCache: no value checks at all. Every index tensor of a step's plan (block tables,
    lengths, cu_seqlens_q, k_starts) is the allocator's or built from the key mask by the cache."""
    import transformers
    from packaging.version import Version

    from hf_attn_plugin import PagedCache
    from tests.models import DECODERS, make_pair

    monkeypatch.setenv(_checks.ENV, "1")
    model, _ = make_pair(DECODERS["llama"]())
    calls = []
    real = paged_ops.require
    monkeypatch.setattr(paged_ops, "require", lambda conds, *, host: (calls.append(len(conds)), real(conds, host=host)))
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: k_starts on every step
    cache = PagedCache(model, max_batch_size=2, num_pages=16, page_size=4)
    kwarg = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                   **{kwarg: cache})
    assert cache.get_seq_length() == 9  # it ran: 6 prompt + 3 of the 4 new tokens cached
    assert calls == []  # the layers run the step's plan (paged_ops.run), which checks nothing


def test_modified_or_mismatched_plan_tensors_are_checked(backend, monkeypatch):
    monkeypatch.setenv(_checks.ENV, "1")  # the mismatches below are host checks, even on a GPU
    cache = PagePool(1, 2, 16, num_pages=8, page_size=4, max_seqs=4, max_seq_len=32, dtype=torch.float32,
                         device=DEV)
    sid = cache.add_sequence()
    plan = cache.plan([sid], [6])
    kv = torch.randn(6, 2, 16, device=DEV)
    small = torch.zeros(1, 4, 2, 16, device=DEV)  # another cache's (smaller) pools
    with pytest.raises(ValueError, match="planned for 32 slots, the pools hold 4"):
        write_kv(small, small.clone(), kv, kv, plan.slot_mapping)
    with pytest.raises(ValueError, match="planned for 8 pages, the pools hold 1"):
        paged_attention(torch.randn(6, 4, 16, device=DEV), small, small, plan.block_tables, plan.seq_lens,
                        cu_seqlens_q=plan.cu_seqlens_q, max_seqlen_q=6)
    with pytest.raises(ValueError, match="planned for 6 tokens"):
        paged_attention(torch.randn(5, 4, 16, device=DEV), cache.k_pools[0], cache.v_pools[0], plan.block_tables,
                        plan.seq_lens, cu_seqlens_q=plan.cu_seqlens_q, max_seqlen_q=6)
    monkeypatch.setenv(_checks.ENV, GPU_CHECKS)
    plan.slot_mapping[0] = 10**6  # modified in place: no longer trusted
    with pytest.raises(ValueError, match="slot_mapping has a slot >= 32"):
        write_kv(cache.k_pools[0], cache.v_pools[0], kv, kv, plan.slot_mapping)
    plan.block_tables[0, 1] = 50
    with pytest.raises(ValueError, match="block_tables entry"):
        paged_attention(torch.randn(1, 4, 16, device=DEV), cache.k_pools[0], cache.v_pools[0], plan.block_tables,
                        plan.seq_lens)


def test_checks_switch(backend, monkeypatch):
    monkeypatch.setenv(_checks.ENV, "1")
    k_pool = torch.zeros(3, 4, 2, 8, device=DEV)
    kv = torch.ones(2, 2, 8, device=DEV)
    twice = torch.tensor([5, 5], device=DEV)
    write_kv(k_pool, k_pool.clone(), kv, kv, twice)  # default: duplicates are not looked for (a sort)
    monkeypatch.setenv(_checks.ENV, "full")
    with pytest.raises(ValueError, match="slot_mapping holds a slot twice"):
        write_kv(k_pool, k_pool.clone(), kv, kv, twice)
    write_kv(k_pool, k_pool.clone(), kv, kv, torch.tensor([-1, -1], device=DEV))  # skipped tokens may repeat
    q, kp, vp, bt, seq_lens = _setup()
    sinks = torch.tensor([0.0, math.inf, 0.0, 0.0], device=DEV)
    with pytest.raises(ValueError, match=r"sinks must not be \+inf"):
        paged_attention(q, kp, vp, bt, seq_lens, sinks=sinks)
    cache = _cache()  # full also checks the plan's own tensors
    spy = _Spy(monkeypatch)
    plan = cache.plan([cache.add_sequence()], [3])
    write_kv(cache.k_pools[0], cache.v_pools[0], torch.ones(3, 1, 2), torch.ones(3, 1, 2), plan.slot_mapping)
    assert spy.conditions == 2
    monkeypatch.setenv(_checks.ENV, "0")
    spy.conditions = 0
    write_kv(cache.k_pools[0], cache.v_pools[0], torch.ones(3, 1, 2), torch.ones(3, 1, 2), torch.tensor([0, 1, 2]))
    paged_attention(q, kp, vp, bt, seq_lens)
    assert spy.conditions == 0
    monkeypatch.setenv(_checks.ENV, "yes")
    with pytest.raises(ValueError, match="HF_ATTN_PLUGIN_CHECKS='yes': expected 0"):
        paged_attention(q, kp, vp, bt, seq_lens)


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU a failing device-side assert ends the process")
def test_device_side_asserts_trace_under_compile(reference_backend):
    """Under torch.compile the checks are device-side asserts in the graph (no break, no sync)."""
    q, k_pool, v_pool, bt, seq_lens = _setup()
    kv = torch.randn(2, 2, 16, device=DEV)

    def step(q, kv, slots, seq_lens):
        write_kv(k_pool, v_pool, kv, kv, slots)
        return paged_attention(q, k_pool, v_pool, bt, seq_lens)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    slots = torch.tensor([5, 20], device=DEV)
    torch.testing.assert_close(compiled(q, kv, slots, seq_lens), step(q, kv, slots, seq_lens))
    with pytest.raises(RuntimeError, match="slot_mapping has a slot >= 32"):
        compiled(q, kv, torch.tensor([5, 32], device=DEV), seq_lens)
    with pytest.raises(RuntimeError, match="seq_lens must be in"):
        compiled(q, kv, slots, torch.tensor([5, 17], dtype=torch.int32, device=DEV))


# =========================================================================== GPU: the device-side asserts fire
_GPU_SCRIPT = """
import torch
from hf_attn_plugin.paged_ops import paged_attention, write_kv
pool = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
bt = torch.arange(8, dtype=torch.int32, device="cuda").view(2, 4) % 4
lens = torch.tensor([30, 40], dtype=torch.int32, device="cuda")
q = torch.randn(2, 4, 64, device="cuda", dtype=torch.bfloat16)
{body}
torch.cuda.synchronize()
print("NO ERROR")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("body,match", [
    ("write_kv(pool, pool.clone(), q[:, :2], q[:, :2], torch.tensor([3, 64]).cuda())", "slot_mapping has a slot"),
    ("bt[1, 2] = 9\npaged_attention(q, pool, pool, bt, lens)", "block_tables entry"),
    ("lens[0] = 65\npaged_attention(q, pool, pool, bt, lens)", "seq_lens must be in"),
])
def test_gpu_device_side_assert_fires(body, match):
    """A device-side assert kills the CUDA context: run each case in its own process."""
    script = _GPU_SCRIPT.format(body=textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout
    assert "device-side assert" in proc.stderr or match in proc.stderr, proc.stderr[-2000:]
    full = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, _checks.ENV: "full"})
    assert full.returncode != 0 and "ValueError" in full.stderr and match in full.stderr, full.stderr[-2000:]


@pytest.mark.gpu
def test_gpu_checked_decode_is_cuda_graph_capturable():
    """User tensors are checked by device-side asserts inside the captured graph (no sync)."""
    q, k_pool, v_pool, bt, seq_lens = (t.cuda() for t in _setup())
    out = paged_attention(q, k_pool, v_pool, bt, seq_lens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, k_pool, v_pool, bt, seq_lens)
    graph.replay()
    torch.testing.assert_close(out, _reference(q, k_pool, v_pool, bt, seq_lens), atol=2e-3, rtol=2e-3)
