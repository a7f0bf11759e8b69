"""Reliability at the public boundary (issue 14): every bad input is refused with a clear error, never a crash
or a silent wrong answer; models run under torch.inference_mode()."""

from __future__ import annotations

import pytest
import torch

import hf_attn_plugin
from hf_attn_plugin import ops
from hf_attn_plugin.reference import attention_reference

from .helpers import kernels_run_on
from .models import DECODERS, make_pair


def _qkv(batch=2, seqlen_q=9, seqlen_k=11, heads_q=4, heads_kv=2, head_dim=16, dtype=torch.float32, device="cpu"):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    return q, k, v


def _seg(*rows):
    return torch.tensor(rows, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# inference_mode
# ---------------------------------------------------------------------------------------------------------


def test_forward_and_generate_under_inference_mode():
    ours, eager = make_pair(DECODERS["llama"]())
    ids = torch.randint(1, ours.config.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask).logits
        got_again = ours(ids, attention_mask=mask).logits  # the segment memo across calls
        want = eager(ids, attention_mask=mask).logits
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        ref = eager.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_again, got)
    assert torch.equal(out, ref)


def test_inference_mode_memo_sees_in_place_changes_between_calls():
    """Inference tensors have no version counter: cu_seq_lens edited in place between two forward passes must
    still be read afresh (for them the memo lives for one forward pass)."""
    ours, _ = make_pair(DECODERS["llama"]())
    ids = torch.randint(1, ours.config.vocab_size, (1, 10))
    pos = torch.cat([torch.arange(5), torch.arange(5)])[None]
    with torch.inference_mode():
        cu = torch.tensor([0, 10, 10], dtype=torch.int32)
        kw = dict(position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=10, max_length_k=10)
        ours(ids, **kw)
        cu[1] = 5  # now two packed documents, same tensor object
        got = ours(ids, **kw).logits
        first = ours(ids[:, :5]).logits
        second = ours(ids[:, 5:]).logits
    torch.testing.assert_close(got, torch.cat([first, second], 1), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# position_ids: transformers' own packing rule
# ---------------------------------------------------------------------------------------------------------

POSITIONS = {
    "restart": torch.cat([torch.arange(5), torch.arange(7)]),
    "gap": torch.cat([torch.arange(5), torch.arange(8, 15)]),
    "repeat": torch.cat([torch.arange(5), torch.arange(4, 11)]),
    "offset_start": torch.arange(3, 15),  # not starting at 0, no jump: one sequence
}


@pytest.mark.parametrize("use_cache", [False, None], ids=["no_cache", "default_cache"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", sorted(POSITIONS))
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_position_ids_pack_exactly_like_eager(family, kind, batch, use_cache):
    """transformers packs by position_ids only without a mask and without a cache (a default forward builds a
    DynamicCache: then nothing is packed, whatever the jumps); which jumps start a document is its rule too."""
    ours, eager = make_pair(DECODERS[family]())
    ids = torch.randint(1, ours.config.vocab_size, (batch, 12))
    pos = POSITIONS[kind].repeat(batch, 1)
    if batch == 2:
        pos[1, 8:] += 3  # the second row has another jump
    with torch.no_grad():
        got = ours(ids, position_ids=pos, use_cache=use_cache).logits
        want = eager(ids, position_ids=pos, use_cache=use_cache).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------------------------

BAD_SEGMENTS = {
    "negative batch": (_seg([-1, 0, 9, 0, 11]), "out of range"),
    "batch too large": (_seg([2, 0, 9, 0, 11]), "out of range"),
    "negative q_start": (_seg([0, -2, 9, 0, 11]), "out of range"),
    "negative k_start": (_seg([0, 0, 9, -1, 11]), "out of range"),
    "q_end past the row": (_seg([0, 0, 10, 0, 11]), "out of range"),
    "k_end past the row": (_seg([0, 0, 9, 0, 12]), "out of range"),
    "q_start after q_end": (_seg([0, 5, 4, 0, 11]), "out of range"),
    "k_start after k_end": (_seg([0, 0, 9, 6, 5]), "out of range"),
    "overlapping queries": (_seg([0, 0, 5, 0, 5], [1, 0, 9, 0, 9], [0, 4, 9, 5, 11]), "overlap"),
    "overlapping keys": (_seg([0, 0, 4, 0, 5], [0, 4, 9, 4, 11]), "key ranges"),
    "overlap hidden behind an empty range": (_seg([0, 0, 9, 0, 11], [0, 3, 3, 0, 0], [0, 5, 6, 0, 6]), "overlap"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(BAD_SEGMENTS))
def test_invalid_segments_are_refused(case, backend, monkeypatch):
    if backend == "triton" and not kernels_run_on("cpu"):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", backend)
    segments, message = BAD_SEGMENTS[case]
    q, k, v = _qkv(head_dim=64)
    with pytest.raises(ValueError, match=message):
        ops.attention(q, k, v, segments=segments)


def test_valid_edge_segments_are_accepted(reference_backend):
    q, k, v = _qkv()
    ok = _seg([0, 0, 4, 0, 6], [0, 4, 9, 6, 11], [1, 0, 0, 0, 0], [1, 9, 9, 11, 11], [1, 0, 9, 2, 2])
    out = ops.attention(q, k, v, segments=ok)  # touching ranges, empty ranges at both ends: all fine
    torch.testing.assert_close(out, attention_reference(q, k, v, segments=ok)[0])
    ops.attention(q, k, v, segments=ok[:0])  # no segment at all


def test_checks_level_0_skips_value_checks_and_full_checks_on_host(monkeypatch, reference_backend):
    q, k, v = _qkv()
    bad = _seg([0, 0, 9, 0, 12])
    monkeypatch.setenv("HF_ATTN_PLUGIN_CHECKS", "0")
    ops.attention(q, k, v, segments=_seg([0, 0, 5, 0, 5], [0, 4, 9, 4, 9]))  # overlaps not looked at
    monkeypatch.setenv("HF_ATTN_PLUGIN_CHECKS", "full")
    with pytest.raises(ValueError, match="out of range"):
        ops.attention(q, k, v, segments=bad)
    monkeypatch.setenv("HF_ATTN_PLUGIN_CHECKS", "2")
    with pytest.raises(ValueError, match="HF_ATTN_PLUGIN_CHECKS"):
        ops.attention(q, k, v)


def test_device_side_checks_need_no_host_sync(monkeypatch):
    """host=False (what CUDA tensors get at level 1) enqueues torch._assert_async and reads no value."""
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append(cond))
    ops.check_segments(_seg([0, 0, 9, 0, 12]), 2, 9, 11, 9, 11, host=False)
    assert len(calls) == 4 and not bool(calls[0])


def test_max_seqlen_smaller_than_segments_is_refused(reference_backend):
    q, k, v = _qkv()
    segments = _seg([0, 0, 4, 0, 5], [0, 4, 9, 5, 11], [1, 2, 9, 0, 9])
    ops.attention(q, k, v, segments=segments, max_seqlen_q=7, max_seqlen_k=9)  # the true maxima: fine
    with pytest.raises(ValueError, match="max_seqlen_q=6"):
        ops.attention(q, k, v, segments=segments, max_seqlen_q=6)
    with pytest.raises(ValueError, match="max_seqlen_k=8"):
        ops.attention(q, k, v, segments=segments, max_seqlen_k=8)
    with pytest.raises(ValueError, match="max_seqlen_k must be >= 0, got -3"):
        ops.attention(q, k, v, segments=segments, max_seqlen_k=-3)
    with pytest.raises(ValueError, match="max_seqlen_q must be an integer, got 7.0"):
        ops.attention(q, k, v, segments=segments, max_seqlen_q=7.0)


@pytest.mark.skipif(not kernels_run_on("cpu"), reason="needs the Triton interpreter")
def test_max_seqlen_too_small_on_triton_is_refused_not_truncated(monkeypatch):
    """Before the check the kernel grid covered max_seqlen_q rows only: the rest came back as zeros."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q, k, v = _qkv(batch=1, seqlen_q=96, seqlen_k=96, head_dim=64)
    segments = _seg([0, 0, 90, 0, 90])
    want = attention_reference(q, k, v, segments=segments)[0]
    torch.testing.assert_close(ops.attention(q, k, v, segments=segments, max_seqlen_q=90), want)
    with pytest.raises(ValueError, match="max_seqlen_q=16"):
        ops.attention(q, k, v, segments=segments, max_seqlen_q=16, max_seqlen_k=90)


@pytest.mark.gpu
def test_gpu_value_checks_on_cuda_tensors(monkeypatch):
    """The CUDA side of the value checks that the tests above run on CPU tensors (the Triton ones only under the
    interpreter): with HF_ATTN_PLUGIN_CHECKS=full, bad segments, non-finite sinks and a too-small max_seqlen_q on
    CUDA tensors raise ValueError on the host, before any kernel runs (at the default level they are device-side
    asserts, which leave the CUDA context unusable); valid ones give the reference's output."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_CHECKS", "full")
    q, k, v = _qkv(head_dim=64, device="cuda")
    for case, (segments, message) in BAD_SEGMENTS.items():
        with pytest.raises(ValueError, match=message):
            ops.attention(q, k, v, segments=segments.cuda())
    for bad in (float("inf"), float("nan")):
        sinks = torch.randn(4, device="cuda")
        sinks[1] = bad
        with pytest.raises(ValueError, match="sinks must be finite or -inf"):
            ops.attention(q, k, v, sinks=sinks)
    segments = _seg([0, 0, 9, 0, 11], [1, 2, 9, 0, 9]).cuda()
    with pytest.raises(ValueError, match="max_seqlen_q=6"):
        ops.attention(q, k, v, segments=segments, max_seqlen_q=6)
    want = attention_reference(q.double(), k.double(), v.double(), segments=segments)[0]
    torch.testing.assert_close(ops.attention(q, k, v, segments=segments).double(), want, atol=2e-5, rtol=1e-4)


def test_bad_cu_seq_lens_are_refused():
    ours, _ = make_pair(DECODERS["llama"]())
    ids = torch.randint(1, ours.config.vocab_size, (1, 10))
    pos = torch.cat([torch.arange(4), torch.arange(6)])[None]
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)  # past the packed row
    with pytest.raises(ValueError, match="out of range"):
        ours(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q=3"):
        ours(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=6)


# ---------------------------------------------------------------------------------------------------------
# other arguments
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(window=-2), "window must be"),
        (dict(window=2.7), "window must be"),
        (dict(window=True), "window must be"),
        (dict(softcap=-1.0), "softcap must be"),
        (dict(softcap=float("inf")), "softcap must be"),
        (dict(softcap=float("nan")), "softcap must be"),
    ],
)
def test_bad_window_and_softcap_are_refused(kwargs, message, reference_backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        ops.attention(q, k, v, **kwargs)


def test_zero_window_and_softcap_mean_none(reference_backend):
    q, k, v = _qkv()
    torch.testing.assert_close(ops.attention(q, k, v, window=0, softcap=0.0), ops.attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_inputs_are_refused(dtype, reference_backend):
    q, k, v = (t.to(dtype) for t in _qkv())
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        ops.attention(q, k, v)


def test_zero_kv_heads_is_refused():
    q = torch.randn(1, 4, 2, 8)
    k = v = torch.randn(1, 4, 0, 8)
    with pytest.raises(ValueError, match="at least one head"):
        ops.attention(q, k, v)


@pytest.mark.parametrize("which", ["k", "v", "sinks", "segments"])
def test_inputs_on_another_device_are_refused(which):
    q, k, v = _qkv()
    args = dict(k=k, v=v, sinks=torch.randn(4), segments=_seg([0, 0, 9, 0, 11]))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta but q is on cpu"):
        ops.attention(q, args["k"], args["v"], sinks=args["sinks"], segments=args["segments"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_sinks_are_refused(bad, backend, monkeypatch):
    if backend == "triton" and not kernels_run_on("cpu"):
        pytest.skip("needs the Triton interpreter")
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", backend)
    q, k, v = _qkv(head_dim=64)
    sinks = torch.randn(4)
    sinks[1] = bad
    with pytest.raises(ValueError, match="sinks must be finite or -inf"):
        ops.attention(q, k, v, sinks=sinks)
    sinks[1] = -float("inf")  # a sink that never wins: the same as no sink for that head
    out = ops.attention(q, k, v, sinks=sinks)
    want = attention_reference(q, k, v, sinks=sinks)[0]
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not kernels_run_on("cpu"), reason="needs the Triton interpreter")
def test_bf16_on_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q, k, v = _qkv(head_dim=64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 on the Triton interpreter"):
        ops.attention(q, k, v)
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "reference")
    ops.attention(q, k, v)  # the reference backend is fine with bf16


def test_public_name_is_validated():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="out of range"):
        hf_attn_plugin.attention(q, k, v, segments=_seg([0, 0, 9, 0, 12]))
