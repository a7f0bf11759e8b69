"""Attention dropout in training (issue 15 item 2).

* exact: the kernels against the reference given the kernels' own mask (``flash.dropout_mask`` materialises it
  for a seed), forward and backward, FA2's error rule (``run_case``);
* statistical: the kernels' keep rate and output mean/variance against eager's ``F.dropout``;
* deterministic: the same ``torch.manual_seed`` gives the same outputs and gradients, through the op;
* plumbing: the custom op (both backends), opcheck, transformers in training, paged calls refused.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must precede the first @triton.jit import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_attn_plugin import ops, reference  # noqa: E402
from hf_attn_plugin.ops import AttentionParams  # noqa: E402

from .helpers import each_candidate  # noqa: E402
from .test_flash_kernels import CACHE, PACKED, run_case  # noqa: E402


# ---------------------------------------------------------------------------------------------- exact (interpreter)


def test_dropout_exact_given_the_mask(flash_cpu):
    run_case(flash_cpu, D=32, Sq=50, Sk=70, Hq=4, Hkv=2, dropout_p=0.3)


def test_dropout_exact_every_feature_fp16(flash_cpu):
    """GQA, window, softcap, sinks, cache segments (mask indexed by padded positions), a transposed q."""
    run_case(flash_cpu, D=48, dtype=torch.float16, dropout_p=0.2, sinks=True, softcap=5.0, window=21, segments=CACHE,
             B=2, Sq=64, Sk=90, Hq=4, Hkv=2, q_transposed=True)


def test_dropout_exact_packed_bidirectional(flash_cpu):
    run_case(flash_cpu, D=16, dropout_p=0.5, segments=PACKED, Sq=100, Hq=2, Hkv=1, causal=False)


def test_dropout_exact_warp_specialized(flash_cpu, monkeypatch):
    """The warp-specialized forward and dK/dV draw the same mask (one loop over (head, tile) pairs)."""
    from hf_attn_plugin.kernels import configs

    monkeypatch.setitem(configs._INTERPRET, "fwd", configs.Config(32, 16, 4, 1, warp_spec=True))
    monkeypatch.setitem(configs._INTERPRET, "bwd_dkdv", configs.Config(16, 32, 4, 1, warp_spec=True))
    run_case(flash_cpu, D=32, dtype=torch.float16, dropout_p=0.25, window=30, Sq=70, Hq=8, Hkv=2)


def test_dropout_changes_the_output_and_p0_is_no_dropout(flash_cpu):
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    seed = ops.dropout_seed("cpu")
    plain, lse = flash_cpu.flash_attn_forward(q, k, v, AttentionParams(0.25))
    dropped, lse_d = flash_cpu.flash_attn_forward(q, k, v, AttentionParams(0.25, dropout_p=0.4, seed=seed))
    zero, _ = flash_cpu.flash_attn_forward(q, k, v, AttentionParams(0.25, dropout_p=0.0, seed=seed))
    assert (dropped - plain).abs().max() > 0.1  # dropout happened
    torch.testing.assert_close(lse_d, lse, rtol=0, atol=0)  # the LSE ignores dropout
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dropout needs params.seed"):
        flash_cpu.flash_attn_forward(q, k, v, AttentionParams(0.25, dropout_p=0.4))


# ---------------------------------------------------------------------------------------------- the mask


def test_mask_is_deterministic_per_seed_and_keeps_1_minus_p(flash_cpu):
    seed = torch.tensor([123456789], dtype=torch.int64)
    m1 = flash_cpu.dropout_mask(seed, 2, 3, 64, 80, 0.3)
    m2 = flash_cpu.dropout_mask(seed.clone(), 2, 3, 64, 80, 0.3)
    other = flash_cpu.dropout_mask(seed + 1, 2, 3, 64, 80, 0.3)
    assert m1.shape == (2, 3, 64, 80) and m1.dtype == torch.bool
    assert torch.equal(m1, m2)
    assert (m1 != other).float().mean() > 0.3  # independent masks disagree on 2 p (1 - p) = 42% of entries
    n = m1.numel()
    assert abs(m1.float().mean().item() - 0.7) < 4 * math.sqrt(0.21 / n)  # 4 sigma
    # no structure across heads / batches / rows: each slice keeps ~70% and slices differ
    per_head = m1.float().mean((2, 3))
    assert (per_head - 0.7).abs().max() < 0.04
    assert not torch.equal(m1[0, 0], m1[0, 1]) and not torch.equal(m1[0, 0], m1[1, 0])
    # a smaller shape sees the same coordinates' bits: the mask depends on (b, h, i, j) only
    assert torch.equal(flash_cpu.dropout_mask(seed, 2, 3, 40, 50, 0.3), m1[:, :, :40, :50])


# ---------------------------------------------------------------------------------------------- statistics vs eager


def _eager_dropout_attention(q, k, v, p):
    """transformers' eager: softmax, then ``F.dropout`` (training), then ``@ V``; [B, S, H, D] in and out."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    probs = F.dropout(torch.softmax(s, -1), p=p, training=True)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _statistics_match(got, want, plain):
    # unbiased: the dropped outputs scatter around the dropout-free output with the same spread as eager's
    d_got, d_want = (got - plain).double(), (want - plain).double()
    assert abs(d_got.mean().item()) < 0.1 * d_want.std().item()
    ratio = d_got.var().item() / d_want.var().item()
    assert 0.85 < ratio < 1.15, ratio


def test_statistics_match_eager_dropout(flash_cpu):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 64, 4, 16) for _ in range(3))
    p = 0.3
    plain, _ = flash_cpu.flash_attn_forward(q, k, v, AttentionParams(0.25, causal=False))
    got, _ = flash_cpu.flash_attn_forward(q, k, v, AttentionParams(0.25, causal=False, dropout_p=p,
                                                                   seed=ops.dropout_seed("cpu")))
    _statistics_match(got, _eager_dropout_attention(q, k, v, p), plain)


# ---------------------------------------------------------------------------------------------- the op


def _qkv(device="cpu", dtype=torch.float32):
    q = torch.randn(2, 4, 24, 16, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 30, 2, 16, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 30, 2, 16, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _run_op(q, k, v, seed, **kw):
    torch.manual_seed(seed)
    out = ops.attention(q, k, v, causal=True, window=10, dropout_p=0.3, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out.detach(), grads


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_is_deterministic_for_a_manual_seed(backend, monkeypatch, flash_cpu):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", backend)
    q, k, v = _qkv()
    out1, g1 = _run_op(q, k, v, 7)
    out2, g2 = _run_op(q, k, v, 7)
    out3, _ = _run_op(q, k, v, 8)
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(out1, out3)


def test_op_triton_backend_matches_reference_with_the_kernels_mask(monkeypatch, flash_cpu):
    """Through the custom op and autograd: the seed drawn after torch.manual_seed is the one the kernels used."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q, k, v = _qkv()
    out, grads = _run_op(q, k, v, 11)
    torch.manual_seed(11)
    seed = ops.dropout_seed("cpu")
    mask = flash_cpu.dropout_mask(seed, 2, 4, 24, 30, 0.3)
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_reference(*xs, causal=True, window=10, dropout_p=0.3, dropout_mask=mask)
    want = torch.autograd.grad(ref, xs, torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


def test_op_reference_backend_backward_matches_autograd(reference_backend):
    """The reference backend's written-out backward (with the mask) equals autograd through the reference."""
    q, k, v = _qkv()
    out, grads = _run_op(q, k, v, 3)
    torch.manual_seed(3)
    mask = ops._reference_dropout_mask(q, k, AttentionParams(0.25, dropout_p=0.3, seed=ops.dropout_seed("cpu")))
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_reference(*xs, causal=True, window=10, dropout_p=0.3, dropout_mask=mask)
    want = torch.autograd.grad(ref, xs, torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4)


def test_op_opcheck_with_dropout(reference_backend):
    q, k, v = (t.detach() for t in _qkv())
    seed = ops.dropout_seed("cpu")
    torch.library.opcheck(ops._attention_fwd, (q, k, v, None, None, 0.25, True, 0, 0.0, 24, 30, 0.3, seed))
    out, lse = ops._attention_fwd(q, k, v, None, None, 0.25, True, 0, 0.0, 24, 30, 0.3, seed)
    torch.library.opcheck(ops._attention_bwd, (torch.randn_like(out), q, k, v, out, lse, None, None, 0.25, True, 0,
                                               0.0, 24, 30, 0.3, seed))


def test_op_compiles_fullgraph_with_dropout(reference_backend):
    """The seed is an ordinary random op in the graph: torch.compile(fullgraph) runs it, and with Inductor's
    ``fallback_random`` (torch's RNG instead of Inductor's own) it draws exactly what eager draws."""
    import torch._inductor.config as inductor_config

    q, k, v = _qkv()
    compiled = torch.compile(lambda q, k, v: ops.attention(q, k, v, causal=True, window=10, dropout_p=0.3),
                             fullgraph=True)
    # config.patch, not monkeypatch: undoing a monkeypatch of a config module's attribute deletes the option
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(5)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want, want_grads = _run_op(q, k, v, 5)
    torch.testing.assert_close(out.detach(), want, atol=0, rtol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True])
def test_op_refuses_bad_dropout(bad):
    q, k, v = (t.detach() for t in _qkv())
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        ops.attention(q, k, v, dropout_p=bad)


def test_reference_needs_a_mask_of_the_right_shape():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="needs dropout_mask"):
        reference.attention_reference(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"\[B, Hq, Sq, Sk\]"):
        reference.attention_reference(q, q, q, dropout_p=0.1, dropout_mask=torch.ones(1, 2, 5, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- transformers


def test_paged_call_with_dropout_is_refused():
    from hf_attn_plugin.integration.attention import describe_paged_call

    module = torch.nn.Module()
    module.is_causal = True
    with pytest.raises(NotImplementedError, match="dropout .* paged KV cache"):
        describe_paged_call(module, torch.randn(1, 2, 1, 16), 0.1, None, {})


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 64, 72, 128, 192, 256])
def test_gpu_dropout_exact_bf16(flash_gpu, D):
    run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, dropout_p=0.1, sinks=True, softcap=30.0,
             window=300, segments=[[0, 10, 700, 0, 900], [1, 0, 500, 0, 500]], B=2, Sq=700, Sk=900, Hq=8, Hkv=2,
             q_transposed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_dropout_every_tuning_candidate(flash_gpu, monkeypatch, D):
    """Every candidate (warp-specialized ones included) regenerates the forward's mask in the backward."""
    for i, _ in each_candidate(monkeypatch, (D,)):
        try:
            run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, Sq=600, Sk=700, Hq=4, Hkv=2, window=250,
                     dropout_p=0.2)
        except AssertionError as exc:
            pytest.fail(f"candidate #{i} at D={D}: {exc}")


@pytest.mark.gpu
def test_gpu_dropout_statistics_and_determinism(flash_gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q, k, v = (torch.randn(4, 512, 8, 64, device="cuda") for _ in range(3))
    p = 0.1
    plain = ops.attention(q, k, v, causal=False)
    torch.manual_seed(0)
    got = ops.attention(q, k, v, causal=False, dropout_p=p)
    torch.manual_seed(0)
    assert torch.equal(got, ops.attention(q, k, v, causal=False, dropout_p=p))
    assert not torch.equal(got, ops.attention(q, k, v, causal=False, dropout_p=p))
    _statistics_match(got, _eager_dropout_attention(q, k, v, p), plain)
    keep = flash_gpu.dropout_mask(ops.dropout_seed("cuda"), 4, 8, 512, 512, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 1e-3


@pytest.mark.gpu
def test_gpu_dropout_cuda_graph_draws_a_new_mask_per_replay(monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    monkeypatch.setenv("HF_ATTN_PLUGIN_AUTOTUNE", "0")
    q, k, v = (torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ops.attention(q, k, v, dropout_p=0.2)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.attention(q, k, v, dropout_p=0.2)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)
