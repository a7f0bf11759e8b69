"""AttentionParams (hf_attn_plugin/kernels/params.py): one normalisation, and every layer taking the one object."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_attn_plugin import ops, reference
from hf_attn_plugin.ops import AttentionParams


def test_create_normalises_every_off_spelling_once():
    p = AttentionParams.create(64)
    assert p == AttentionParams(scale=0.125, causal=True, window=0, softcap=0.0, sinks=None, segments=None,
                                max_seqlen_q=0, max_seqlen_k=0, dropout_p=0.0, seed=None)
    for off in (None, 0, -1):  # None, 0 and (as the kernels always read it) a negative window: no window
        assert AttentionParams.create(64, window=off).window == 0
    for off in (None, 0, 0.0):
        assert AttentionParams.create(64, softcap=off).softcap == 0.0
    p = AttentionParams.create(16, scale=1, causal=0, window=7, softcap=30, max_seqlen_q=5, max_seqlen_k=None,
                               dropout_p=None)
    assert (p.scale, p.causal, p.window, p.softcap, p.max_seqlen_q, p.max_seqlen_k, p.dropout_p) == (1.0, False, 7,
                                                                                                      30.0, 5, 0, 0.0)
    assert type(p.scale) is float and type(p.causal) is bool and type(p.window) is int and type(p.softcap) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.window = 3


def test_max_seqlens_reads_zero_as_the_padded_lengths():
    assert AttentionParams.create(64).max_seqlens(10, 20) == (10, 20)
    assert AttentionParams.create(64, max_seqlen_q=4, max_seqlen_k=9).max_seqlens(10, 20) == (4, 9)


def test_features_name_what_a_call_uses():
    assert AttentionParams.create(64, causal=False).features == ()
    p = AttentionParams.create(64, window=8, softcap=5.0, sinks=torch.zeros(2), dropout_p=0.1,
                               segments=torch.zeros(0, 5, dtype=torch.int32))
    assert p.features == ("segments", "window", "softcap", "sinks", "dropout")


def test_resolve_takes_params_or_keywords_not_both():
    p = AttentionParams.create(64, window=4)
    assert AttentionParams.resolve(p, 64, {}) is p
    assert AttentionParams.resolve(None, 64, {"window": 4}) == p
    with pytest.raises(TypeError, match="either params or its keywords"):
        AttentionParams.resolve(p, 64, {"window": 4})
    with pytest.raises(TypeError, match="must be an AttentionParams"):
        AttentionParams.resolve({"window": 4}, 64, {})
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(TypeError, match="either params or its keywords"):
        reference.attention_reference(q, q, q, p, causal=False)
    with pytest.raises(TypeError):  # an unknown keyword
        reference.attention_reference(q, q, q, windows=3)


def test_reference_params_and_keyword_forms_agree():
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 11, 2, 16), torch.randn(2, 11, 2, 16)
    sinks = torch.randn(4)
    seg = torch.tensor([[0, 0, 9, 0, 11], [1, 2, 7, 1, 8]], dtype=torch.int32)
    kw = dict(scale=0.3, causal=True, window=5, softcap=4.0, sinks=sinks, segments=seg)
    params = AttentionParams.create(16, **kw)
    for a, b in zip(reference.attention_reference(q, k, v, params), reference.attention_reference(q, k, v, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dout = torch.randn_like(q)
    for a, b in zip(reference.attention_reference_backward(dout, q, k, v, params),
                    reference.attention_reference_backward(dout, q, k, v, **kw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_compute_dtype():
    """Default: float32 for 16-bit inputs; ``compute_dtype=float16`` carries every op out in float16 (the tests'
    "PyTorch at the kernel's dtype"), which is measurably less accurate than float32 against float64."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float16) for _ in range(3))
    exact, exact_lse = reference.attention_reference(q.double(), k.double(), v.double())
    f32, f32_lse = reference.attention_reference(q, k, v)
    f16, f16_lse = reference.attention_reference(q, k, v, compute_dtype=torch.float16)
    assert f16.dtype == f32.dtype == torch.float16 and f16_lse.dtype == f32_lse.dtype == torch.float32
    torch.testing.assert_close(f32, reference.attention_reference(q, k, v, compute_dtype=torch.float32)[0], rtol=0,
                               atol=0)
    err16 = (f16_lse.double() - exact_lse).abs().max().item()
    err32 = (f32_lse.double() - exact_lse).abs().max().item()
    assert err16 > 10 * err32, (err16, err32)
    assert (f16.double() - exact).abs().max().item() < 1e-2


def test_attention_trusted_takes_params_or_keywords(reference_backend):
    q, k, v = torch.randn(1, 12, 4, 16), torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16)
    params = AttentionParams.create(16, window=5, softcap=3.0)
    want = ops.attention(q, k, v, window=5, softcap=3.0)
    torch.testing.assert_close(ops.attention_trusted(q, k, v, params), want, rtol=0, atol=0)
    torch.testing.assert_close(ops.attention_trusted(q, k, v, window=5, softcap=3.0), want, rtol=0, atol=0)


def test_attention_trusted_draws_a_seed_for_dropout(reference_backend):
    """params from describe_call carry dropout_p but no seed: each call draws one (torch.manual_seed repeats it)."""
    q, k, v = torch.randn(1, 12, 4, 16), torch.randn(1, 12, 2, 16), torch.randn(1, 12, 2, 16)
    params = AttentionParams.create(16, dropout_p=0.5)
    torch.manual_seed(3)
    a = ops.attention_trusted(q, k, v, params)
    b = ops.attention_trusted(q, k, v, params)
    torch.manual_seed(3)
    assert not torch.equal(a, b) and torch.equal(a, ops.attention(q, k, v, dropout_p=0.5))


def test_describe_call_returns_normalised_params():
    from hf_attn_plugin.integration import AttentionCall, describe_call

    module = torch.nn.Module()
    module.is_causal = True
    query, key = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    call = describe_call(module, query, key, None, sliding_window=None, softcap=None, dropout=0.0)
    assert call == AttentionParams.create(16)
    call = describe_call(module, query, key, None, scaling=0.5, sliding_window=3, softcap=20, dropout=0.1,
                         is_causal=False)
    assert call == AttentionParams(0.5, causal=False, window=3, softcap=20.0, dropout_p=0.1)
    assert AttentionCall is AttentionParams  # the former name stays importable
