"""kernels/primitives.py: the building blocks the flash and paged kernels share, each checked on its own in a tiny
kernel against PyTorch (the reference's mask, torch.tanh, softmax, autograd). Interpreter on CPU, compiled on a GPU."""

import itertools
import math

import pytest
import torch
import triton
import triton.language as tl

from hf_attn_plugin.kernels import primitives
from hf_attn_plugin.reference import attention_mask_from_segments

from .helpers import DEVICE, needs_kernels

pytestmark = needs_kernels


def test_constants():
    assert primitives.LOG2E.value == math.log2(math.e)
    assert primitives.LN2.value == math.log(2.0)


@triton.jit
def _scores_kernel(QK, S, T, scale2, cap_scale, cap2, N: tl.constexpr, SOFTCAP: tl.constexpr):
    offs = tl.arange(0, N)
    s, t = primitives.scores(tl.load(QK + offs), scale2, cap_scale, cap2, SOFTCAP=SOFTCAP)
    tl.store(S + offs, s)
    tl.store(T + offs, t)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter, at +-1e30
@pytest.mark.parametrize("softcap", [0.0, 30.0, 0.5])
def test_scores_base2_and_softcap(softcap):
    scale = 0.125
    qk = torch.randn(256, dtype=torch.float64) * 40
    qk[:4] = torch.tensor([1e4, -1e4, 1e30, -1e30])  # tanh saturates to +-1: no NaN, no inf
    s = torch.empty(256, dtype=torch.float32, device=DEVICE)
    t = torch.empty_like(s)
    _scores_kernel[(1,)](qk.float().to(DEVICE), s, t, *primitives.score_scales(scale, softcap), N=256,
                         SOFTCAP=softcap > 0)
    x = scale * qk.float().double()
    want_s = (softcap * torch.tanh(x / softcap) if softcap else x) * math.log2(math.e)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s.cpu().double(), want_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.cpu().double(), torch.tanh(x / softcap) if softcap else qk.float().double(),
                               rtol=1e-5, atol=1e-6)


@triton.jit
def _mask_kernel(S, Out, Pos, col_start, col_end, window, M: tl.constexpr, N: tl.constexpr,
                 CHECK_START: tl.constexpr, CHECK_END: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 KEYS_ON_ROWS: tl.constexpr):
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    pos = tl.load(Pos + rows)
    if KEYS_ON_ROWS:  # the dK/dV kernels' layout: s^T [keys, queries]
        ptrs = S + cols[:, None] * M + rows[None, :]
        s = primitives.mask_scores(tl.load(ptrs), pos[None, :], cols[:, None], col_start, col_end, window,
                                   CHECK_START=CHECK_START, CHECK_END=CHECK_END, CAUSAL=CAUSAL, WINDOW=WINDOW)
        tl.store(Out + cols[:, None] * M + rows[None, :], s)
    else:
        ptrs = S + rows[:, None] * N + cols[None, :]
        s = primitives.mask_scores(tl.load(ptrs), pos[:, None], cols[None, :], col_start, col_end, window,
                                   CHECK_START=CHECK_START, CHECK_END=CHECK_END, CAUSAL=CAUSAL, WINDOW=WINDOW)
        tl.store(Out + rows[:, None] * N + cols[None, :], s)


@pytest.mark.parametrize("check_start,check_end,causal,window", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("keys_on_rows", [False, True])
def test_mask_scores_matches_reference_mask(check_start, check_end, causal, window, keys_on_rows):
    """Query ``i`` of ``M`` new tokens over keys ``[start, end)`` of ``N`` sits at key position ``i + end - M``
    (bottom-right aligned): the reference's mask for that one segment."""
    M, N, W = 16, 32, 5
    start = 7 if check_start else 0
    end = 27 if check_end else N
    pos = torch.arange(M, dtype=torch.int32) + (end - M)
    s = torch.randn(M, N)
    seg = torch.tensor([[0, 0, M, start, end]], dtype=torch.int32)
    visible = attention_mask_from_segments(seg, 1, M, N, causal=causal, window=W if window else None)[0]
    out = torch.empty(M, N, device=DEVICE)
    if keys_on_rows:
        s_in, out = s.t().contiguous().to(DEVICE), out.t().contiguous()
    else:
        s_in = s.to(DEVICE)
    _mask_kernel[(1,)](s_in, out, pos.to(DEVICE), start, end, W, M=M, N=N, CHECK_START=check_start,
                       CHECK_END=check_end, CAUSAL=causal, WINDOW=window, KEYS_ON_ROWS=keys_on_rows)
    got = out.cpu().t() if keys_on_rows else out.cpu()
    assert torch.equal(got, torch.where(visible, s, float("-inf")))


@triton.jit
def _softmax_kernel(S, V, Out, Max, Sum, Lse, M: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
                    D: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over key tiles of base-2 scores ``S [M, N]``: ``Out = softmax @ V``, the running max and
    sum, the base-2 log-sum-exp."""
    rows = tl.arange(0, M)
    dims = tl.arange(0, D)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for n0 in tl.static_range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = tl.load(S + rows[:, None] * N + cols[None, :])
        p, alpha, m_new, l_i = primitives.online_softmax_step(s, m_i, l_i, MASKED=MASKED)
        v = tl.load(V + cols[:, None] * D + dims[None, :])
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out, lse2 = primitives.finish_softmax(acc, m_i, l_i)
    tl.store(Out + rows[:, None] * D + dims[None, :], out)
    tl.store(Max + rows, m_i)
    tl.store(Sum + rows, l_i)
    tl.store(Lse + rows, lse2)


@pytest.mark.parametrize("masked", [False, True])
def test_online_softmax_step(masked):
    M, N, BLOCK_N, D = 16, 64, 16, 16
    s2 = torch.randn(M, N) * 8  # base-2 scores
    if masked:
        s2[0] = float("-inf")  # a row that sees nothing
        s2[1, :BLOCK_N] = float("-inf")  # nothing in the first tile
        s2[2, BLOCK_N:] = float("-inf")  # nothing after the first tile
        s2[3, ::2] = float("-inf")
    v = torch.randn(N, D)
    out = torch.empty(M, D, device=DEVICE)
    m = torch.empty(M, device=DEVICE)
    l = torch.empty(M, device=DEVICE)
    lse2 = torch.empty(M, device=DEVICE)
    _softmax_kernel[(1,)](s2.to(DEVICE), v.to(DEVICE), out, m, l, lse2, M=M, N=N, BLOCK_N=BLOCK_N, D=D,
                          MASKED=masked)
    out, m, l, lse2 = out.cpu(), m.cpu(), l.cpu(), lse2.cpu()
    live = torch.ones(M, dtype=torch.bool)
    if masked:
        live[0] = False
        assert m[0] == float("-inf") and l[0] == 0 and lse2[0] == float("-inf")
        assert torch.equal(out[0], torch.zeros(D))
    assert torch.isfinite(out).all() and torch.isfinite(l).all()
    s2 = s2.double()[live]
    torch.testing.assert_close(m[live].double(), s2.amax(1))
    torch.testing.assert_close(l[live].double(), torch.exp2(s2 - s2.amax(1, True)).sum(1))
    torch.testing.assert_close(lse2[live].double(), torch.logsumexp(s2 * math.log(2.0), 1) / math.log(2.0))
    torch.testing.assert_close(out[live].double(), torch.softmax(s2 * math.log(2.0), 1) @ v.double(), rtol=1e-5,
                               atol=1e-5)


@triton.jit
def _grad_kernel(P, DP, Delta, T, DS, M: tl.constexpr, N: tl.constexpr, SOFTCAP: tl.constexpr):
    idx = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    delta = tl.load(Delta + tl.arange(0, M))
    ds = primitives.scores_grad(tl.load(P + idx), tl.load(DP + idx), delta[:, None], tl.load(T + idx),
                                SOFTCAP=SOFTCAP)
    tl.store(DS + idx, ds)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_scores_grad_is_the_gradient(softcap):
    """dL/dx for ``P = softmax(s(x))``, ``s = cap * tanh(x / cap)`` (or ``x``) and any ``dL/dP``: autograd's."""
    M, N = 16, 32
    x = (torch.randn(M, N, dtype=torch.float64) * 3).requires_grad_()
    s = softcap * torch.tanh(x / softcap) if softcap else x
    p = torch.softmax(s, -1)
    dp = torch.randn(M, N, dtype=torch.float64)
    (p * dp).sum().backward()
    t = torch.tanh(x / softcap) if softcap else x
    delta = (p * dp).sum(-1)
    ds = torch.empty(M, N, device=DEVICE)
    _grad_kernel[(1,)](*(y.detach().float().contiguous().to(DEVICE) for y in (p, dp, delta, t)), ds, M=M, N=N,
                       SOFTCAP=softcap > 0)
    torch.testing.assert_close(ds.cpu().double(), x.grad, rtol=1e-4, atol=1e-6)
