"""The custom op: registration checks, torch.compile, backend selection, input validation (CPU)."""

from __future__ import annotations

import pytest
import torch

import hf_attn_plugin
from hf_attn_plugin import ops
from hf_attn_plugin.reference import attention_reference

from .models import DECODERS, make_pair


def _qkv(batch=2, seqlen_q=9, seqlen_k=11, heads_q=4, heads_kv=2, head_dim=16, dtype=torch.float32):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype)
    return q, k, v


SEGMENTS = torch.tensor([[0, 0, 4, 0, 5], [0, 4, 9, 5, 11], [1, 2, 9, 0, 9]], dtype=torch.int32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(causal=True),
        dict(causal=False, segments=SEGMENTS),
        dict(causal=True, window=3, softcap=4.0, sinks=True, segments=SEGMENTS),
    ],
    ids=["causal", "bidirectional-segments", "everything"],
)
def test_opcheck(kwargs, reference_backend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    sinks = torch.randn(4, requires_grad=True) if kwargs.pop("sinks", False) else None
    args = (
        q, k, v, kwargs.get("segments"), sinks, 0.25, kwargs["causal"], kwargs.get("window", 0),
        kwargs.get("softcap", 0.0), 9, 11,
    )
    torch.library.opcheck(torch.ops.hf_attn_plugin.attention_fwd.default, args)


def test_op_matches_reference_forward_and_backward(reference_backend):
    q, k, v = (t.double().requires_grad_() for t in _qkv())
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    kw = dict(scale=0.3, causal=True, window=4, softcap=3.0, sinks=sinks, segments=SEGMENTS)
    out = ops.attention(q, k, v, **kw)
    want, _ = attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    want_grads = torch.autograd.grad(want, (q, k, v, sinks), dout)
    for got, exp in zip(got_grads, want_grads):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_calls_skip_the_dispatcher_and_match_the_op(reference_backend, monkeypatch, dropout_p):
    """Eager calls run the op's bodies through a plain autograd.Function (the op's Python dispatch costs more host
    time than the kernels at small shapes): forward, gradients (incl. sinks) and the dropout mask equal the op's,
    bit for bit, and no op is dispatched."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    sinks = torch.randn(4, requires_grad=True)
    kw = dict(scale=0.3, causal=True, window=4, softcap=3.0, segments=SEGMENTS)
    seed = ops.dropout_seed("cpu") if dropout_p else None
    params = ops.AttentionParams.create(16, sinks=sinks, dropout_p=dropout_p, seed=seed, **kw)
    out_op, _ = torch.ops.hf_attn_plugin.attention_fwd(q, k, v, SEGMENTS, sinks, 0.3, True, 4, 3.0, 9, 11,
                                                       dropout_p, seed)
    dout = torch.randn_like(out_op)
    want = (out_op, *torch.autograd.grad(out_op, (q, k, v, sinks), dout))

    def no_op(*args, **kwargs):
        raise AssertionError("the op was dispatched for an eager call")

    monkeypatch.setattr(ops, "_attention_fwd", no_op)
    out = ops.attention_trusted(q, k, v, params)
    got = (out, *torch.autograd.grad(out, (q, k, v, sinks), dout))
    for name, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
        assert torch.equal(g, w), name
    with torch.no_grad():
        assert torch.equal(ops.attention_trusted(q, k, v, params), out_op)


def test_stride_zero_grad_from_sum(reference_backend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    ops.attention(q, k, v).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_fully_masked_rows_give_zeros_and_no_nan(reference_backend):
    q, k, v = (t.requires_grad_() for t in _qkv())
    segments = torch.tensor([[0, 3, 9, 0, 0], [1, 0, 0, 0, 11]], dtype=torch.int32)  # an empty key range, an empty query range
    out, lse = ops.attention(q, k, v, segments=segments, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert not t.grad.any()


def test_compiled_model_has_no_graph_breaks(reference_backend):
    ours, eager = make_pair(DECODERS["llama"]())
    ids = torch.randint(1, ours.config.vocab_size, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)  # padded rows differ by design (zeros here, uniform in eager)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    got = compiled(ids, attention_mask=mask, labels=labels)
    got.loss.backward()
    want = eager(ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, atol=2e-5, rtol=1e-5)
    valid = mask.bool()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=2e-5, rtol=1e-4)
    w_ours = ours.model.layers[0].self_attn.q_proj.weight.grad
    w_eager = eager.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(w_ours, w_eager, atol=1e-5, rtol=1e-3)


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "auto")
    assert ops.backend_for(torch.device("cpu")) == "reference"
    assert ops.backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "reference")
    assert ops.backend_for(torch.device("cuda")) == "reference"
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ops.backend_for(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for(torch.device("cpu")) == "triton"
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "fast")
    with pytest.raises(ValueError, match="expected one of"):
        ops.backend_for(torch.device("cpu"))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 5, 3, 8), (2, 5, 2, 8), (2, 5, 2, 8)), "multiple of key/value heads"),
        (((2, 5, 4, 8), (2, 5, 2, 8), (2, 6, 2, 8)), "key and value must have the same batch, sequence length"),
        (((2, 5, 4, 8), (3, 5, 2, 8), (3, 5, 2, 8)), "batch or head_dim"),
        (((2, 5, 4), (2, 5, 2, 8), (2, 5, 2, 8)), "4-D"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        hf_attn_plugin.attention(q, k, v)


def test_bad_sinks_and_segments_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one logit per query head"):
        ops.attention(q, k, v, sinks=torch.randn(3))
    with pytest.raises(ValueError, match="int32"):
        ops.attention(q, k, v, segments=SEGMENTS.long())


def test_plugin_is_registered_on_import():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "plugin" in AttentionInterface._global_mapping
    assert "plugin" in AttentionMaskInterface._global_mapping
    assert hf_attn_plugin.ATTN_IMPLEMENTATION == "plugin"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_lse_is_not_differentiable(reference_backend, compiled):
    """The LSE carries no gradient (the backward ignores it): it says so (requires_grad False, backward through it
    alone raises) instead of dropping a gradient silently, as it did (q.grad all zeros); the output's gradient is
    unchanged by having asked for the LSE."""
    q, k, v = (t.requires_grad_() for t in _qkv())

    def fn(q, k, v):
        return ops.attention(q, k, v, return_lse=True)

    fn = torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn
    out, lse = fn(q, k, v)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()
    (out * lse.unsqueeze(-1).transpose(1, 2)).sum().backward()  # lse enters as a constant
    got = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    out2, lse2 = ops.attention(q2, k2, v2, return_lse=True)
    (out2 * lse2.detach().unsqueeze(-1).transpose(1, 2)).sum().backward()
    for g, t in zip(got, (q2, k2, v2)):
        torch.testing.assert_close(g, t.grad)
