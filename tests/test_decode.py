"""The decode route (hf_attn_plugin.decode_ops): short query chunks over a contiguous KV cache through the paged
kernel, read in place as a virtual pool. Kernel results against reference.py, the routing decisions, no copy of
the cache, and greedy generation through the route against eager.

Without CUDA the kernels run under the Triton interpreter (fp32/fp16, small shapes); the ``gpu`` tests add bf16,
the Llama-1B head layout and long contexts.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit: the interpreter is chosen there
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_attn_plugin  # noqa: E402,F401  (registers "plugin")
from hf_attn_plugin import decode_ops, ops, reference  # noqa: E402
from hf_attn_plugin.integration import attention as attention_module  # noqa: E402
from hf_attn_plugin.integration.masks import segments_from_key_mask  # noqa: E402

from .helpers import DEVICE as DEV, needs_kernels  # noqa: E402


def _cache_tensors(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, device=DEV, head_dim_v=None):
    """What transformers passes, in the flash layout: q from rotary ([B, H, S, D] memory, transposed), K/V from
    the cache's torch.cat ([B, Hkv, Sk, D] memory, transposed; V ``head_dim_v`` wide: MLA)."""
    q = torch.randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype, device=device).transpose(1, 2)
    v = torch.randn(batch, heads_kv, seqlen_k, head_dim_v or head_dim, dtype=dtype, device=device).transpose(1, 2)
    return q, k, v


def _left_padding_segments(batch, seqlen_q, seqlen_k, device=DEV):
    """Row b starts at 3 * b (its first keys are padding), as plugin_mask + describe_call build them."""
    starts = torch.arange(batch, device=device) * 3
    key_mask = torch.arange(seqlen_k, device=device)[None, :] >= starts[:, None]
    return segments_from_key_mask(key_mask, seqlen_q)


def _check(q, k, v, *, segments=None, causal=True, window=None, softcap=None, sinks=None, num_splits=0, tol=None):
    scale = q.shape[-1] ** -0.5
    assert decode_ops.applies(q, k, v, causal=causal, sinks=sinks, key_segments=segments)
    got = decode_ops.attention(q, k, v, scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks,
                               key_segments=segments, num_splits=num_splits)
    want, _ = reference.attention_reference(
        q.double(), k.double(), v.double(), scale=scale, causal=causal, window=window, softcap=softcap,
        sinks=None if sinks is None else sinks.double(), segments=segments)
    assert got.shape == (*q.shape[:3], v.shape[-1]) and got.dtype == q.dtype
    atol = tol or (2e-5 if q.dtype == torch.float32 else 2e-3)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol)
    return got


# --------------------------------------------------------------------------- kernel vs reference
@needs_kernels
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa8"])
@pytest.mark.parametrize("batch,seqlen_q,seqlen_k", [(1, 1, 37), (2, 1, 50), (3, 3, 41), (2, 16, 53), (1, 5, 6)])
def test_matches_reference(triton_backend, batch, seqlen_q, seqlen_k, heads):
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, *heads, 16, torch.float32)
    _check(q, k, v)


@needs_kernels
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_left_padding_matches_reference(triton_backend, seqlen_q, num_splits):
    batch, seqlen_k = 3, 45
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, 8, 2, 16, torch.float32)
    segments = _left_padding_segments(batch, seqlen_q, seqlen_k)
    _check(q, k, v, segments=segments, num_splits=num_splits)


@needs_kernels
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_many_splits_match_reference(triton_backend, seqlen_q):
    """Split-K pieces merged inside the kernel (interpreter config: 10 tiles of 32 keys per row, cut into 3 pieces by
    the kernel's rule in a grid of 8), with left padding and sinks; the step's plan and its counters serve two
    layers."""
    batch, seqlen_k = 2, 300
    segments = _left_padding_segments(batch, seqlen_q, seqlen_k)
    sinks = torch.randn(8, device=DEV)
    for _layer in range(2):
        q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, 8, 2, 16, torch.float32)
        _check(q, k, v, segments=segments, sinks=sinks, num_splits=8)


@needs_kernels
@pytest.mark.parametrize("dims", [(24, 16), (16, 40), (72, 32)], ids=["d24_dv16", "d16_dv40", "d72_dv32"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("seqlen_q,num_splits", [(1, 1), (1, 3), (3, 3)])
def test_value_head_dim_of_its_own_matches_reference(triton_backend, dims, heads, seqlen_q, num_splits):
    """Multi-head latent attention (DeepSeek: K 192 wide, V 128): V, the output and the split-K partials are the value
    head dim wide, with left padding, sinks, a window and softcap; a layer without them after it."""
    head_dim, head_dim_v = dims
    batch, seqlen_k = 2, 120
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, *heads, head_dim, torch.float32, head_dim_v=head_dim_v)
    segments = _left_padding_segments(batch, seqlen_q, seqlen_k)
    sinks = torch.randn(heads[0], device=DEV)
    _check(q, k, v, segments=segments, sinks=sinks, window=50, softcap=5.0, num_splits=num_splits)
    _check(q, k, v, num_splits=num_splits)


@needs_kernels
def test_value_sliced_from_a_wider_buffer_is_read_with_its_own_head_dim(triton_backend):
    """V sliced to fewer columns of a buffer with K's position stride: the kernel must read V (and write the output)
    Dv wide. Before the decode route knew a value head dim it read such a V with K's head dim (the sliced-off
    columns), and then refused it."""
    q = torch.randn(2, 1, 4, 32, device=DEV)
    k = torch.randn(2, 20, 2, 32, device=DEV)
    v = torch.randn(2, 20, 2, 32, device=DEV)[..., :16]
    assert k.stride(1) == v.stride(1)
    _check(q, k, v, num_splits=2)


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3])
def test_value_in_another_layout_than_key(triton_backend, num_splits):
    """DeepSeek-V3's cache under transformers: K from torch.cat is [B, Hkv, Sk, D] in memory, V is the value half of
    the kv projection's [B, Sk, Hkv, 32] output (positions-major, 16 of 32 columns): each is addressed with its own
    pages per batch row (K: Hkv * Sk, V: Sk)."""
    batch, seqlen_k, heads, head_dim, head_dim_v = 3, 40, 4, 24, 16
    q = torch.randn(batch, heads, 1, head_dim, device=DEV).transpose(1, 2)
    k = torch.randn(batch, heads, seqlen_k, head_dim, device=DEV).transpose(1, 2)
    v = torch.randn(batch, seqlen_k, heads, 2 * head_dim_v, device=DEV)[..., head_dim_v:]
    assert decode_ops._virtual_pool_rows(k, v) == (heads * seqlen_k, seqlen_k)
    _check(q, k, v, num_splits=num_splits)
    _check(q, k, v, segments=_left_padding_segments(batch, 1, seqlen_k), num_splits=num_splits)


@needs_kernels
def test_static_cache_tail_and_short_rows(triton_backend):
    """A static cache's empty tail (k_end < Sk) and a row with fewer real keys than queries (zero rows)."""
    batch, seqlen_q, seqlen_k = 3, 4, 40
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, 4, 2, 16, torch.float32)
    key_mask = torch.zeros(batch, seqlen_k, dtype=torch.bool, device=DEV)
    key_mask[0, :29] = True  # static cache written up to 29
    key_mask[1, 5:29] = True  # left padding + tail
    key_mask[2, 27:29] = True  # 2 real keys, 4 queries: the first 2 query rows see nothing
    segments = segments_from_key_mask(key_mask, seqlen_q)
    got = _check(q, k, v, segments=segments)
    assert got[2, :2].abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("feature", ["window", "softcap", "sinks", "noncausal"])
def test_features_match_reference(triton_backend, feature):
    q, k, v = _cache_tensors(2, 3, 47, 8, 2, 32, torch.float32)
    kwargs = dict(window=9) if feature == "window" else dict(softcap=3.0) if feature == "softcap" else {}
    if feature == "sinks":
        kwargs["sinks"] = torch.randn(8, device=DEV)
    if feature == "noncausal":
        kwargs["causal"] = False
    _check(q, k, v, num_splits=2, **kwargs)


@needs_kernels
def test_window_and_sinks_with_left_padding(triton_backend):
    q, k, v = _cache_tensors(3, 2, 39, 8, 2, 16, torch.float32)
    _check(q, k, v, segments=_left_padding_segments(3, 2, 39), window=7, sinks=torch.randn(8, device=DEV),
           num_splits=2)


@needs_kernels
def test_fp16(triton_backend):
    q, k, v = _cache_tensors(2, 2, 70, 8, 2, 64, torch.float16)
    _check(q, k, v, num_splits=2)


@needs_kernels
def test_static_cache_slice_reads_in_place(triton_backend):
    """K/V that are views into a larger buffer (a static cache's first Sk slots) are read where they are."""
    buf_k = torch.randn(2, 2, 64, 16, device=DEV)
    buf_v = torch.randn(2, 2, 64, 16, device=DEV)
    k, v = buf_k[:, :, :33].transpose(1, 2), buf_v[:, :, :33].transpose(1, 2)
    q = torch.randn(2, 4, 1, 16, device=DEV).transpose(1, 2)
    _check(q, k, v)


# --------------------------------------------------------------------------- routing decisions
def _route_args(**overrides):
    q, k, v = _cache_tensors(2, 1, 20, 4, 2, 16, torch.float32)
    args = dict(q=q, k=k, v=v, causal=True, sinks=None, key_segments=None)
    args.update(overrides)
    return args


def test_applies_only_where_exact(triton_backend, monkeypatch):
    assert decode_ops.applies(**_route_args())
    q17, k, v = _cache_tensors(1, 17, 40, 4, 2, 16, torch.float32)
    assert not decode_ops.applies(q17, k, v, causal=True, sinks=None, key_segments=None)  # long chunk: flash
    q, k, v = _cache_tensors(1, 5, 5, 4, 2, 16, torch.float32)
    assert not decode_ops.applies(q, k, v, causal=True, sinks=None, key_segments=None)  # no cache (Sq == Sk)
    segs = _left_padding_segments(2, 1, 20)
    assert decode_ops.applies(**_route_args(key_segments=segs))
    assert not decode_ops.applies(**_route_args(key_segments=segs, causal=False))
    assert decode_ops.applies(**_route_args(causal=False))
    assert not decode_ops.applies(**_route_args(key_segments=segs[:1]))  # not one segment per row
    q, k, v = _cache_tensors(2, 1, 20, 4, 2, 16, torch.float64)
    assert not decode_ops.applies(q, k, v, causal=True, sinks=None, key_segments=None)  # no fp64 kernels
    q, k, v = _cache_tensors(2, 1, 20, 4, 2, 16, torch.float32)
    assert decode_ops.applies(q, k.contiguous(), v, causal=True, sinks=None, key_segments=None)  # own layouts: fine
    assert not decode_ops.applies(q, k, v[..., ::2], causal=True, sinks=None, key_segments=None)  # v's last stride 2
    monkeypatch.setenv("HF_ATTN_PLUGIN_DECODE", "0")
    assert not decode_ops.applies(**_route_args())


def test_applies_never_with_grad_or_reference_backend(triton_backend, monkeypatch):
    q, k, v = _cache_tensors(2, 1, 20, 4, 2, 16, torch.float32)
    q.requires_grad_(True)
    assert not decode_ops.applies(q, k, v, causal=True, sinks=None, key_segments=None)
    with torch.no_grad():
        assert decode_ops.applies(q, k, v, causal=True, sinks=None, key_segments=None)
    sinks = torch.nn.Parameter(torch.zeros(4))  # a model's sinks (GPT-OSS): routed when no gradient is recorded
    assert not decode_ops.applies(q.detach(), k, v, causal=True, sinks=sinks, key_segments=None)
    with torch.no_grad():
        assert decode_ops.applies(q.detach(), k, v, causal=True, sinks=sinks, key_segments=None)
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "reference")
    assert not decode_ops.applies(q.detach(), k, v, causal=True, sinks=None, key_segments=None)


def test_virtual_pool_pages_are_the_cache_positions():
    """Page b * rows + j at the position stride from the cache's start is position j of batch row b: the kernel reads
    the cache in place (no copy, no view)."""
    batch, seqlen_k, heads_kv, head_dim = 3, 11, 2, 8
    k = torch.randn(batch, heads_kv, seqlen_k, head_dim).transpose(1, 2)
    rows, rows_v = decode_ops._virtual_pool_rows(k, k)
    assert rows == rows_v == heads_kv * seqlen_k
    num_pages = (batch - 1) * rows + seqlen_k
    ss = k.stride(1)  # the page stride the kernel is given
    pool = k.as_strided((num_pages, heads_kv, head_dim), (ss, k.stride(2), 1), k.storage_offset())
    pages = torch.arange(batch)[:, None] * rows + torch.arange(seqlen_k)[None, :]  # the kernel's page numbers
    assert torch.equal(pool[pages], k)


def test_unaddressable_layouts_are_refused():
    """Layouts the virtual pool cannot address keep the flash path."""
    inside = torch.randn(2, 8, 2, 16)[:, :5]  # a slice of a longer [B, S, H, D] buffer: addressable
    assert decode_ops._virtual_pool_rows(inside, inside) == (8, 8)
    strided = torch.randn(2, 6, 2, 16)[:, :, :, ::2]  # last stride 2
    assert decode_ops._virtual_pool_rows(strided, strided) is None
    uneven = torch.randn(2 * 7 * 16).as_strided((2, 3, 1, 16), (7 * 16 - 8, 16, 16, 1))  # sb not a multiple of ss
    assert decode_ops._virtual_pool_rows(uneven, uneven) is None


# --------------------------------------------------------------------------- the mask function
@pytest.mark.parametrize("case", [
    dict(q_length=1, kv_length=30, q_offset=29),  # dynamic cache, decode step
    dict(q_length=1, kv_length=40, q_offset=29),  # static cache: unwritten tail
    dict(q_length=1, kv_length=40, q_offset=torch.tensor(29)),  # static cache, offset as a tensor (compiled route)
    dict(q_length=3, kv_length=40, q_offset=12),  # short chunk against a static cache
    dict(q_length=1, kv_length=8, q_offset=33, kv_offset=26),  # sliding-window cache: the last 8 positions
    dict(q_length=1, kv_length=34, q_offset=33, columns=30),  # user mask shorter than the cache: missing = absent
])
@pytest.mark.parametrize("padded", [False, True])
def test_plugin_mask_marks_exactly_the_real_written_slots(case, padded):
    from hf_attn_plugin.integration.masks import plugin_mask

    case = dict(case)
    columns = case.pop("columns", case.get("kv_offset", 0) + case["kv_length"])
    batch = 3
    user = torch.ones(batch, columns, dtype=torch.long)
    if padded:
        user[1, :5] = 0
        user[2, :2] = 0
    got = plugin_mask(batch, attention_mask=user, **case)
    kv_offset, end = case.get("kv_offset", 0), int(case["q_offset"]) + case["q_length"]
    want = torch.zeros(batch, case["kv_length"], dtype=torch.bool)
    for b in range(batch):
        for j in range(case["kv_length"]):
            position = kv_offset + j
            want[b, j] = position < columns and bool(user[b, position]) and position < end
    if bool(want.all()):
        assert got is None
    else:
        assert got is not None and torch.equal(got, want)


# --------------------------------------------------------------------------- the step plan (eager) and the op (traced)
@needs_kernels
def test_layers_of_a_step_share_one_plan_and_new_segments_get_a_new_one(triton_backend, monkeypatch):
    """Every layer of a step (same shapes, same segments tensor, its own K/V) reuses the first layer's plan; the next
    step's segments (a static cache: same shapes, one more real key) get a new plan, never the stale lengths."""
    built = []
    original = decode_ops._new_plan
    monkeypatch.setattr(decode_ops, "_new_plan", lambda *a: built.append(1) or original(*a))
    batch, seqlen_k = 3, 40
    for step, k_end in enumerate((30, 31)):
        key_mask = torch.zeros(batch, seqlen_k, dtype=torch.bool, device=DEV)
        key_mask[0, :k_end] = True  # written up to k_end; rows 1 and 2 left-padded
        key_mask[1:, 8:k_end] = True
        segments = segments_from_key_mask(key_mask, 1)
        for _layer in range(3):
            q, k, v = _cache_tensors(batch, 1, seqlen_k, 8, 2, 16, torch.float32)
            _check(q, k, v, segments=segments, num_splits=2)
        assert len(built) == step + 1


@needs_kernels
def test_a_step_with_segments_after_one_without_gets_its_own_plan(triton_backend, monkeypatch):
    """Same shapes, first without key segments (no padding), then with (left padding): the plan memo must not reuse
    (or trip over) the segment-less entry. The H200 run found `None()` called here."""
    built = []
    original = decode_ops._new_plan
    monkeypatch.setattr(decode_ops, "_new_plan", lambda *a: built.append(1) or original(*a))
    batch, seqlen_k = 2, 24
    q, k, v = _cache_tensors(batch, 1, seqlen_k, 8, 2, 16, torch.float32)
    _check(q, k, v, segments=None, num_splits=2)
    key_mask = torch.ones(batch, seqlen_k, dtype=torch.bool, device=DEV)
    key_mask[1, :5] = False
    _check(q, k, v, segments=segments_from_key_mask(key_mask, 1), num_splits=2)
    _check(q, k, v, segments=None, num_splits=2)
    assert len(built) == 3


@needs_kernels
def test_decode_op_registration_value_head_dim(triton_backend):
    """The traced path's fake implementation gives the output the value head dim (MLA)."""
    batch, seqlen_q, seqlen_k = 2, 1, 20
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, 4, 2, 16, torch.float32, head_dim_v=24)
    rows = decode_ops._virtual_pool_rows(k, v)
    index = decode_ops._index_tensors(batch, seqlen_q, seqlen_k, None, q.device)
    args = (q, k, v, *index, None, *rows, 0.25, True, 0, 0.0, 0)
    torch.library.opcheck(decode_ops._decode_op, args)
    assert decode_ops._decode_op(*args).shape == (batch, seqlen_q, 4, 24)


@needs_kernels
def test_decode_op_registration(triton_backend):
    """The traced path's op: schema, fake implementation (shape, strides) and AOT dispatch agree with the real one."""
    batch, seqlen_q, seqlen_k = 2, 3, 20
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, 4, 2, 16, torch.float32)
    rows = decode_ops._virtual_pool_rows(k, v)
    index = decode_ops._index_tensors(batch, seqlen_q, seqlen_k, _left_padding_segments(batch, seqlen_q, seqlen_k),
                                      q.device)
    args = (q, k, v, *index, None, *rows, 0.25, True, 0, 0.0, 0)
    torch.library.opcheck(decode_ops._decode_op, args)
    want = decode_ops.attention(q, k, v, scale=0.25, key_segments=_left_padding_segments(batch, seqlen_q, seqlen_k))
    torch.testing.assert_close(decode_ops._decode_op(*args), want)


def test_decode_op_refuses_a_layout_its_table_was_not_built_for():
    """Inductor must hand the op K/V with the traced strides (needs_exact_strides): a contiguous copy would put
    position j of row b elsewhere, so the op refuses it instead of reading the wrong keys."""
    q, k, v = _cache_tensors(2, 1, 20, 4, 2, 16, torch.float32)
    rows = decode_ops._virtual_pool_rows(k, v)
    index = decode_ops._index_tensors(2, 1, 20, None, q.device)
    with pytest.raises(RuntimeError, match="changed their layout"):
        decode_ops._decode_op(q, k.contiguous(), v.contiguous(), *index, None, *rows, 0.25, True, 0, 0.0, 0)


# --------------------------------------------------------------------------- through the attention function
class _Attention(torch.nn.Module):
    is_causal = True


def _forbid_flash(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the flash op ran: the decode route was expected")

    monkeypatch.setattr(ops, "_attention_fwd", fail)


@needs_kernels
def test_plugin_attention_routes_decode_and_keeps_flash_for_the_rest(triton_backend, monkeypatch):
    batch, seqlen_k = 2, 30
    query = torch.randn(batch, 4, 1, 16, device=DEV)  # transformers' [B, H, S, D]
    key = torch.randn(batch, 2, seqlen_k, 16, device=DEV)
    value = torch.randn(batch, 2, seqlen_k, 16, device=DEV)
    want, _ = reference.attention_reference(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                            scale=0.25, causal=True)
    with monkeypatch.context() as m:
        _forbid_flash(m)
        got, _ = attention_module.plugin_attention(_Attention(), query, key, value, None, scaling=0.25)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)

    calls = []
    monkeypatch.setattr(decode_ops, "attention", lambda *a, **k: calls.append(1))
    key_mask = torch.ones(batch, seqlen_k, dtype=torch.bool, device=DEV)
    key_mask[0, :4] = False
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, seqlen_k], dtype=torch.int32, device=DEV)
    with torch.enable_grad():  # a query that needs a gradient: the flash op (it has a backward)
        attention_module.plugin_attention(_Attention(), query.clone().requires_grad_(), key, value, None)
    attention_module.plugin_attention(_Attention(), query[:1], key[:1], value[:1], None, cu_seq_lens_q=cu_q,
                                      cu_seq_lens_k=cu_k)  # packed sequences: flash
    assert calls == []
    attention_module.plugin_attention(_Attention(), query, key, value, key_mask)  # left padding: routed
    assert calls == [1]


# --------------------------------------------------------------------------- generation
def _tiny_llama(impl, heads=4, kv_heads=1):
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


@needs_kernels
@pytest.mark.skipif(DEV == "cuda", reason="fp32 CPU identity test (the interpreter)")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [False, True], ids=["b1", "left_padded_b3"])
def test_greedy_generate_through_the_route_matches_eager(triton_backend, monkeypatch, padded, cache):
    """Dynamic cache: K/V grow by torch.cat each step; static cache: the whole buffer, its empty tail masked."""
    ours, eager = _tiny_llama("plugin"), _tiny_llama("eager")
    eager.load_state_dict(ours.state_dict())
    routed = []
    original = decode_ops.attention
    monkeypatch.setattr(decode_ops, "attention", lambda *a, **k: routed.append(a[0].shape[1]) or original(*a, **k))
    if padded:
        lengths, seqlen = (9, 4, 6), 9
        ids = torch.randint(1, 96, (3, seqlen))
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            mask[row, seqlen - n:] = 1
    else:
        ids, mask = torch.randint(1, 96, (1, 11)), None
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation=cache)
    got = ours.generate(ids, **kwargs)
    want = eager.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert routed.count(1) == 11 * 2  # every decode step of both layers took the route
    # a static cache's prefill is a short chunk against a longer (mostly empty) cache: routed too
    assert len(routed) == 11 * 2 + (2 if cache == "static" else 0)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("batch,seqlen_k", [(1, 4096), (1, 32768 + 5), (4, 4096 + 3), (16, 2048)])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_gpu_llama_1b_heads_bf16(batch, seqlen_q, seqlen_k):
    q, k, v = _cache_tensors(batch, seqlen_q, seqlen_k, 32, 8, 64, torch.bfloat16)
    _check(q, k, v, tol=2e-2)
    segments = _left_padding_segments(batch, seqlen_q, seqlen_k)
    _check(q, k, v, segments=segments, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seqlen_k,heads,dims", [(1, 32768 + 5, (16, 16), (192, 128)),
                                                      (4, 4096 + 3, (32, 8), (128, 64))], ids=["deepseek", "gqa4"])
def test_gpu_value_head_dim_of_its_own_bf16(batch, seqlen_k, heads, dims):
    """MLA shapes (DeepSeek-V2/V3: K 192 wide, V 128, one KV head per query head) and a GQA pair, split-K at B=1."""
    q, k, v = _cache_tensors(batch, 1, seqlen_k, *heads, dims[0], torch.bfloat16, head_dim_v=dims[1])
    _check(q, k, v, tol=2e-2)
    _check(q, k, v, segments=_left_padding_segments(batch, 1, seqlen_k), tol=2e-2)


@pytest.mark.gpu
def test_gpu_layers_after_the_first_relaunch_the_compiled_kernel(monkeypatch):
    """The layers of a step share a plan; the first launch goes through Triton's JIT, the others launch its compiled
    kernel directly (host time). A query whose start is not 16-byte aligned is another specialization: Triton's path
    again, then relaunched too. Every output against the reference."""
    from hf_attn_plugin.kernels import host

    monkeypatch.setattr(host, "_RELAUNCHERS", {})  # relaunchers are shared for the process: none from other tests
    monkeypatch.setattr(decode_ops, "_LAST_PLAN", [None])
    batch, seqlen_k = 4, 700
    plans = []
    for _layer in range(3):
        q, k, v = _cache_tensors(batch, 1, seqlen_k, 32, 8, 64, torch.bfloat16)
        _check(q, k, v, tol=2e-2)
        plan = decode_ops._LAST_PLAN[0][2]
        plans.append(plan)
    assert plans[0] is plans[1] is plans[2]
    (launch,) = plan.launches.values()
    assert len(launch.kernel.compiled) == 1
    # q sliced one element into a buffer: its data pointer moves 2 bytes (not 16-byte aligned)
    for _layer in range(2):
        q, k, v = _cache_tensors(batch, 1, seqlen_k, 32, 8, 64, torch.bfloat16)
        shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)[1:].view(q.shape)
        shifted.copy_(q)
        assert shifted.data_ptr() % 16 != 0
        _check(shifted, k, v, tol=2e-2)
    assert decode_ops._LAST_PLAN[0][2] is plan and len(launch.kernel.compiled) == 2


@pytest.mark.gpu
def test_gpu_decode_step_copies_no_cache():
    """One decode call allocates its output and split-K partials only: nothing of the cache's size."""
    q, k, v = _cache_tensors(1, 1, 32768, 32, 8, 64, torch.bfloat16)
    decode_ops.attention(q, k, v, scale=0.125)  # compile, first-use tables
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    decode_ops.attention(q, k, v, scale=0.125)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < k.numel() * k.element_size() // 16


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_k", [600, 5000], ids=["short", "long"])
def test_gpu_decode_op_never_syncs_and_replays_in_a_cuda_graph(seqlen_k):
    """The traced path (index tensors built from shapes and segments, then the op) never synchronises the host and
    is captured by a CUDA graph; a replay after the cache and the lengths changed gives the eager route's output."""
    batch = 2
    q, k, v = _cache_tensors(batch, 1, seqlen_k, 32, 8, 64, torch.bfloat16)
    key_mask = torch.ones(batch, seqlen_k, dtype=torch.bool, device=DEV)
    key_mask[1, :7] = False
    key_mask[:, seqlen_k - 20:] = False  # a static cache's unwritten tail
    segments = segments_from_key_mask(key_mask, 1)
    rows = decode_ops._virtual_pool_rows(k, v)

    def traced_step():
        index = decode_ops._index_tensors(batch, 1, seqlen_k, segments, q.device)
        return decode_ops._decode_op(q, k, v, *index, None, *rows, 0.125, True, 0, 0.0, 0)

    traced_step()  # compile the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        traced_step()
        decode_ops.attention(q, k, v, scale=0.125, key_segments=segments)  # the eager route (its plan memo too)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        traced_step()  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            captured = traced_step()
    torch.cuda.current_stream().wait_stream(stream)
    k.normal_()
    v.normal_()
    key_mask[:, seqlen_k - 20] = True  # the next step: one more key written
    segments.copy_(segments_from_key_mask(key_mask, 1))
    graph.replay()
    torch.cuda.synchronize()
    want = decode_ops.attention(q, k, v, scale=0.125, key_segments=segments_from_key_mask(key_mask, 1))
    torch.testing.assert_close(captured, want, atol=0, rtol=0)


@needs_kernels
@pytest.mark.skipif(DEV == "cuda", reason="fp32 CPU identity test (the interpreter)")
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss", "qwen3"])
def test_greedy_generate_with_windows_softcap_sinks_matches_eager(triton_backend, monkeypatch, family):
    """Sliding windows (mistral, gemma2, gpt_oss), softcap (gemma2), sinks (gpt_oss), MQA (qwen3), left-padded."""
    from .models import DECODERS, make_pair

    ours, eager = make_pair(DECODERS[family]())
    routed = []
    original = decode_ops.attention
    monkeypatch.setattr(decode_ops, "attention", lambda *a, **k: routed.append(1) or original(*a, **k))
    lengths, seqlen = (8, 5), 8
    ids = torch.randint(1, ours.config.vocab_size, (2, seqlen))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seqlen - n:] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, **kwargs)
    want = eager.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert len(routed) == 7 * ours.config.num_hidden_layers


def test_host_integer_helpers_match_triton():
    """The launch code's plain-Python next_power_of_2 / cdiv (no constexpr_function wrapper) agree with Triton's."""
    import triton

    from hf_attn_plugin.kernels.host import cdiv, next_power_of_2

    for n in list(range(0, 300)) + [1023, 1024, 1025, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True], ids=["b1", "left_padded_b3"])
def test_gpu_greedy_generate_fp32_matches_eager_through_the_route(monkeypatch, padded):
    import transformers

    monkeypatch.delenv("HF_ATTN_PLUGIN_DECODE", raising=False)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="plugin").cuda().eval()
    # a config of its own: from_config sets the attention implementation on the config object it is given, so a
    # shared config would switch `ours` to eager as well (the route was then never taken: seen on the H200)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    eager = eager.cuda().eval()
    eager.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "plugin"
    routed = []
    original = decode_ops.attention
    monkeypatch.setattr(decode_ops, "attention", lambda *a, **k: routed.append(1) or original(*a, **k))
    ids = torch.randint(1, 256, (3 if padded else 1, 2100), device="cuda")  # > 2048 keys: split-K
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :700] = 0
        mask[2, :33] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, **kwargs)
    want = eager.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert len(routed) == 23 * 4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_cache_on_another_device_than_the_current_one():
    """device_map spreads layers over GPUs while the current device stays cuda:0: launch where the tensors are."""
    q, k, v = _cache_tensors(2, 1, 3000, 32, 8, 64, torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        _check(q, k, v, tol=2e-2)
