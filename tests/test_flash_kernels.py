"""Flash kernels vs the reference (hf_attn_plugin/reference.py).

Tolerance rule (FA2's): ``err(kernel vs fp64 reference) <= 2 * err(PyTorch at the kernel's dtype vs
fp64 reference) + 1e-5`` (max abs error) for out, lse, dq, dk, dv and dsinks. "PyTorch at the
kernel's dtype" is the reference with ``compute_dtype`` that dtype: every op (matmuls, softmax,
backward) carried out in it.

CPU: the Triton interpreter (fp32, fp16; small shapes). Without CUDA, ``TRITON_INTERPRET=1`` is set
before the first ``@triton.jit`` is imported (here and in conftest.py): the interpreter is chosen
when triton and the kernels are imported, so it cannot be switched on later in the process. With
CUDA the interpreter tests are skipped (the GPU tests cover them). bf16 ``tl.dot`` is broken in the
interpreter: bf16 runs on the GPU only (``pytest -m gpu``).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_attn_plugin import ops, reference
from hf_attn_plugin.ops import AttentionParams
from hf_attn_plugin.reference import rows_in_segments

from .helpers import (HAS_HOPPER, KERNEL_KINDS, assert_fa2_rule, each_candidate, grad_atol,
                      needs_hopper, pick_gluon_without_gluon, spy_launches)


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------


def run_case(flash, *, B=1, Sq=96, Sk=None, Hq=4, Hkv=2, D=64, Dv=None, dtype=torch.float32, device="cpu",
             causal=True, window=0, softcap=0.0, sinks=False, segments=None, q_transposed=False, kv_transposed=False,
             scale=None, dropout_p=0.0):
    """Run forward + backward through ``flash`` and check everything against the oracles (with dropout: given the
    kernels' own mask, materialised by ``flash.dropout_mask``). ``Dv``: the value head dim (``None``: ``D``)."""
    Sk = Sq if Sk is None else Sk
    Dv = D if Dv is None else Dv
    scale = D**-0.5 if scale is None else scale
    if q_transposed:  # what transformers hands over: a [B, S, H, D] view of [B, H, S, D] memory
        q = torch.randn(B, Hq, Sq, D, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Sq, Hq, D, device=device, dtype=dtype)
    if kv_transposed:
        k = torch.randn(B, Hkv, Sk, D, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Hkv, Sk, Dv, device=device, dtype=dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Sk, Hkv, D, device=device, dtype=dtype)
        v = torch.randn(B, Sk, Hkv, Dv, device=device, dtype=dtype)
    s = torch.randn(Hq, device=device, dtype=torch.float32) if sinks else None
    seg = None if segments is None else torch.tensor(segments, dtype=torch.int32, device=device)
    max_q = Sq if seg is None else int((seg[:, 2] - seg[:, 1]).max().item()) if len(seg) else 1
    max_k = Sk if seg is None else int((seg[:, 4] - seg[:, 3]).max().item()) if len(seg) else 1
    seed = ops.dropout_seed(device) if dropout_p else None
    params = AttentionParams.create(D, scale=scale, causal=causal, window=window, softcap=softcap, sinks=s,
                                    segments=seg, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=dropout_p,
                                    seed=seed)
    mask = flash.dropout_mask(seed, B, Hq, Sq, Sk, dropout_p) if dropout_p else None

    out, lse = flash.flash_attn_forward(q, k, v, params)
    dout = torch.randn_like(out)
    dq, dk, dv, dsinks = flash.flash_attn_backward(dout, q, k, v, out, lse, params)

    def grads(dt, compute_dtype=None):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        sk = s.detach().to(dt).requires_grad_() if sinks else None
        o, l = reference.attention_reference(*xs, dataclasses.replace(params, sinks=sk), dropout_mask=mask,
                                             compute_dtype=compute_dtype)
        g = torch.autograd.grad(o, xs + ([sk] if sinks else []), dout.to(dt))
        return [o, l, *g]

    ref = grads(torch.float64)
    low = grads(dtype, compute_dtype=dtype)  # PyTorch at the kernel's dtype
    got = [out, lse, dq, dk, dv] + ([dsinks] if sinks else [])
    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    assert out.dtype == dtype and out.shape == (B, Sq, Hq, Dv)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    rows_summed = dict(dq=Sk, dk=Sq * (Hq // Hkv), dv=Sq * (Hq // Hkv))  # per-row terms in one gradient entry
    for name, g, r, lo in zip(names, got, ref, low):
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten or NaN)"
        atol = grad_atol(rows_summed[name], bool(softcap)) if name in rows_summed else 1e-5
        assert_fa2_rule(g, r, lo, name, atol=atol)
    if seg is not None:  # rows / keys outside every segment: exactly zero
        inside_q = rows_in_segments(seg, B, Sq, device=device)
        inside_k = rows_in_segments(seg[:, [0, 3, 4, 1, 2]], B, Sk, device=device)
        assert (out[~inside_q] == 0).all() and (lse[~inside_q.unsqueeze(1).expand(-1, Hq, -1)] == 0).all()
        assert (dq[~inside_q] == 0).all()
        assert (dk[~inside_k] == 0).all() and (dv[~inside_k] == 0).all()
    return got


# ----------------------------------------------------------------------------------------------
# CPU: Triton interpreter
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (8, 2), (8, 1)], ids=["mha", "gqa2", "gqa4", "mqa8"])
def test_gqa_ratios(flash_cpu, Hq, Hkv, causal):
    run_case(flash_cpu, Hq=Hq, Hkv=Hkv, Sq=100, causal=causal)


@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_head_dims_fp16(flash_cpu, D):
    run_case(flash_cpu, D=D, dtype=torch.float16, Sq=70, Hq=2, Hkv=1)


def test_head_dim_256(flash_cpu):
    run_case(flash_cpu, D=256, Sq=40, Hq=2, Hkv=1)


@pytest.mark.parametrize("Sq,Sk", [(37, 150), (150, 37), (1, 90), (64, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_q_len_ne_kv_len(flash_cpu, Sq, Sk, causal):
    # Sq > Sk with causal: the top rows see no key at all (out 0, lse 0).
    run_case(flash_cpu, Sq=Sq, Sk=Sk, causal=causal, Hq=2, Hkv=1)


@pytest.mark.parametrize("window,Sq,Sk", [(1, 80, 80), (17, 100, 100), (40, 60, 130), (24, 120, 80)])
def test_sliding_window(flash_cpu, window, Sq, Sk):
    # (24, 120, 80): 40 rows sit before the first key, fully outside the window.
    run_case(flash_cpu, window=window, Sq=Sq, Sk=Sk, Hq=4, Hkv=2)


def test_window_bidirectional(flash_cpu):
    run_case(flash_cpu, window=20, causal=False, Sq=90, Hq=2, Hkv=1)


def test_window_fp16(flash_cpu):
    run_case(flash_cpu, window=33, Sq=130, dtype=torch.float16, Hq=4, Hkv=1)


PACKED = [[0, 0, 13, 0, 13], [0, 13, 13, 13, 13], [0, 13, 50, 13, 50], [0, 50, 51, 50, 51], [0, 51, 100, 51, 100]]
LEFT_PAD = [[0, 7, 64, 7, 64], [1, 0, 64, 0, 64], [2, 31, 64, 31, 64]]
CACHE = [[0, 60, 64, 3, 90], [1, 0, 0, 0, 0], [1, 10, 40, 20, 77]]  # q shorter than k, an empty segment


@pytest.mark.parametrize("segments,B,Sq,Sk", [(PACKED, 1, 100, 100), (LEFT_PAD, 3, 64, 64), (CACHE, 2, 64, 90)],
                         ids=["packed", "left_pad", "cache"])
@pytest.mark.parametrize("causal", [True, False])
def test_segments(flash_cpu, segments, B, Sq, Sk, causal):
    run_case(flash_cpu, segments=segments, B=B, Sq=Sq, Sk=Sk, causal=causal, Hq=2, Hkv=1)


def test_segments_window_fp16(flash_cpu):
    run_case(flash_cpu, segments=PACKED, Sq=100, window=9, dtype=torch.float16, Hq=2, Hkv=1)


def test_no_segments_at_all(flash_cpu):
    seg = torch.zeros(0, 5, dtype=torch.int32)
    q = torch.randn(1, 8, 2, 64)
    out, lse = flash_cpu.flash_attn_forward(q, q[:, :, :1], q[:, :, :1], AttentionParams(0.1, segments=seg))
    assert (out == 0).all() and (lse == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_softcap(flash_cpu, causal):
    run_case(flash_cpu, softcap=2.0, scale=0.5, causal=causal, Sq=80, Hq=4, Hkv=2)


@pytest.mark.parametrize("causal", [True, False])
def test_sinks(flash_cpu, causal):
    run_case(flash_cpu, sinks=True, causal=causal, Sq=80, Sk=100, Hq=4, Hkv=2)


def test_everything_at_once(flash_cpu):
    run_case(flash_cpu, sinks=True, softcap=5.0, window=21, segments=CACHE, B=2, Sq=64, Sk=90, Hq=4, Hkv=1,
             q_transposed=True)


def test_everything_fp16(flash_cpu):
    run_case(flash_cpu, sinks=True, softcap=5.0, window=21, segments=PACKED, Sq=100, Hq=4, Hkv=2,
             dtype=torch.float16, q_transposed=True)


def test_non_contiguous(flash_cpu):
    run_case(flash_cpu, q_transposed=True, kv_transposed=True, Sq=70, Hq=4, Hkv=2)


WARP_SPEC_CASES = {
    "causal_gqa": dict(Sq=100, Hq=4, Hkv=2),
    "bidirectional": dict(Sq=70, Hq=2, Hkv=1, causal=False),
    "q_longer_than_k": dict(Sq=150, Sk=37, Hq=2, Hkv=1),  # top rows see no key: out 0, lse 0
    "window_rows_outside": dict(window=24, Sq=120, Sk=80, Hq=4, Hkv=2),
    "segments_with_empty": dict(segments=CACHE, B=2, Sq=64, Sk=90, Hq=2, Hkv=1),
    "everything_fp16": dict(sinks=True, softcap=5.0, window=21, segments=PACKED, Sq=100, Hq=4, Hkv=2,
                            dtype=torch.float16, q_transposed=True),
    "head_dim_80": dict(D=80, Sq=50, Hq=2, Hkv=1, dtype=torch.float16),
    "gqa4_q_transposed_window": dict(Sq=90, Hq=8, Hkv=2, window=30, q_transposed=True, kv_transposed=True),
    "bidirectional_cache_segments": dict(segments=CACHE, B=2, Sq=64, Sk=90, Hq=4, Hkv=2, causal=False, window=25),
}


@pytest.mark.parametrize("case", list(WARP_SPEC_CASES))
def test_warp_specialized_kernels(flash_cpu, monkeypatch, case):
    """The warp-specialized forward and dK/dV (one masked loop, every load through TMA, no early exit for tiles
    past the segment) against the oracles: the interpreter runs their code path, the GPU suite the compiled form."""
    from hf_attn_plugin.kernels import configs

    monkeypatch.setitem(configs._INTERPRET, "fwd", configs.Config(32, 16, 4, 1, warp_spec=True))
    monkeypatch.setitem(configs._INTERPRET, "bwd_dkdv", configs.Config(16, 32, 4, 1, warp_spec=True))
    run_case(flash_cpu, **WARP_SPEC_CASES[case])


TWO_PASS_CASES = {
    **WARP_SPEC_CASES,
    "dropout_gqa_window": dict(Sq=80, Sk=95, Hq=4, Hkv=2, window=30, dropout_p=0.2),
    "head_dim_160_softcap_sinks": dict(D=160, Sq=40, Hq=2, Hkv=1, softcap=5.0, sinks=True, dtype=torch.float16),
}


def _record_dkdv_passes(monkeypatch):
    """Wraps flash._attn_bwd_dkdv: returns the list of (WANT_DK, WANT_DV) of each launch."""
    from hf_attn_plugin.kernels import flash

    passes = []
    spy_launches(monkeypatch, flash, "_attn_bwd_dkdv",
                 lambda args, kwargs: passes.append((kwargs["WANT_DK"], kwargs["WANT_DV"])))
    return passes


@pytest.mark.parametrize("case", list(TWO_PASS_CASES))
def test_two_pass_dkdv(flash_cpu, monkeypatch, case):
    """``Config.two_pass``: dV in one launch, dK in a second (one accumulator each), against the oracles with every
    feature (dropout regenerates the same mask in both passes)."""
    from hf_attn_plugin.kernels import configs

    monkeypatch.setitem(configs._INTERPRET, "bwd_dkdv", configs.Config(16, 32, 4, 1, two_pass=True))
    passes = _record_dkdv_passes(monkeypatch)
    run_case(flash_cpu, **TWO_PASS_CASES[case])
    assert passes == [(False, True), (True, False)]


def test_two_pass_is_a_triton_mode():
    from hf_attn_plugin.kernels import configs

    with pytest.raises(ValueError, match="two_pass"):
        configs.Config(64, 128, 8, 2, gluon=0, two_pass=True)
    cfg = configs.Config(32, 128, 8, 3, two_pass=True)
    assert configs.Config.from_json(cfg.to_json()) == cfg and cfg.to_json()["two_pass"] is True
    assert "two_pass" not in configs.Config(32, 128, 8, 3).to_json()


def test_warp_specialized_configs_refuse_deep_pipelines():
    from hf_attn_plugin.kernels import configs

    with pytest.raises(ValueError, match="num_stages <= 2"):
        configs.Config(128, 64, 4, 3, warp_spec=True)
    configs.Config(128, 64, 4, 3)  # without warp specialization: fine


def test_gluon_config_falls_back_to_triton_without_importing_gluon(flash_cpu, monkeypatch):
    """A Gluon forward config (Config.gluon >= 0) picked under the interpreter (or for CPU tensors): the forward
    runs the key's Triton config instead and never imports Gluon (kernels/gluon_fwd.py is blocked here)."""
    from hf_attn_plugin.kernels import configs

    asked = pick_gluon_without_gluon(monkeypatch, "fwd", configs.Config(128, 128, 4, 2, gluon=3))
    run_case(flash_cpu, Sq=70, Hq=4, Hkv=2, D=64)
    assert asked[:2] == [("fwd", False), ("fwd", True)]


def test_unsupported_head_dim_is_refused(flash_cpu):
    q = torch.randn(1, 8, 2, 44)  # not a multiple of 8 (every supported dim is: tests/test_head_dims.py)
    with pytest.raises(ValueError, match="head_dim 44 is not supported"):
        flash_cpu.flash_attn_forward(q, q, q, AttentionParams(0.1))


def test_tma_ready_copies_only_what_tma_cannot_address():
    """The forward reads K/V through TMA: 16-byte aligned start and row strides. Aligned views pass through
    untouched (no copy); a view starting mid-vector is copied, with the same values."""
    from hf_attn_plugin.kernels.host import tma_ready

    base = torch.randn(1, 9, 2, 64)
    view = base.transpose(1, 2).transpose(1, 2)[:, 1:]  # aligned: starts 2*64 floats in
    assert tma_ready(view).data_ptr() == view.data_ptr()
    flat = torch.randn(1 + 8 * 2 * 64)
    odd = flat[1:].view(1, 8, 2, 64)  # starts 4 bytes in
    fixed = tma_ready(odd)
    assert fixed.data_ptr() % 16 == 0 and fixed.data_ptr() != odd.data_ptr()
    torch.testing.assert_close(fixed, odd, rtol=0, atol=0)


def test_forward_with_misaligned_kv(flash_cpu):
    """K/V views that TMA cannot address directly give the reference result (copied first)."""
    B, S, H, D = 1, 40, 2, 64
    q = torch.randn(B, S, 4, D)
    k = torch.randn(1 + B * S * H * D)[1:].view(B, S, H, D)
    v = torch.randn(1 + B * S * H * D)[1:].view(B, S, H, D)
    out, lse = flash_cpu.flash_attn_forward(q, k, v, AttentionParams.create(D))
    ref, ref_lse = reference.attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=2e-5, rtol=1e-4)


def test_op_end_to_end_interpreter(flash_cpu, monkeypatch):
    """The custom op on the Triton backend (interpreter), autograd included, vs the reference op."""
    from hf_attn_plugin import ops

    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q = torch.randn(1, 4, 40, 64).transpose(1, 2).requires_grad_()  # [B, S, H, D] view
    k = torch.randn(1, 40, 2, 64, requires_grad=True)
    v = torch.randn(1, 40, 2, 64, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    out = ops.attention(q, k, v, causal=True, window=16, sinks=sinks)
    out.sum().backward()  # stride-0 incoming grad
    got = [out.detach(), q.grad, k.grad, v.grad, sinks.grad]
    xs = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = reference.attention_reference(*xs[:3], causal=True, window=16, sinks=xs[3])
    ref.sum().backward()
    for g, r in zip(got, [ref] + [x.grad for x in xs]):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# GPU (H200): bf16, large shapes, compile, CUDA graphs, opcheck
# ----------------------------------------------------------------------------------------------


GPU_CASES = {
    "causal_gqa_d64": dict(D=64, Sq=1000, Hq=8, Hkv=2),
    "causal_gqa_d96": dict(D=96, Sq=777, Hq=8, Hkv=2),
    "causal_gqa_d128": dict(D=128, Sq=1500, Hq=8, Hkv=2),
    "causal_mqa_d256": dict(D=256, Sq=700, Hq=4, Hkv=1),
    "bidir_d128": dict(D=128, Sq=900, Hq=4, Hkv=4, causal=False),
    "bidir_d80": dict(D=80, Sq=500, Hq=4, Hkv=2, causal=False),
    "chunked_prefill": dict(D=128, Sq=333, Sk=2100, Hq=8, Hkv=2),
    "q_longer_than_k": dict(D=128, Sq=1100, Sk=600, Hq=4, Hkv=2),
    "window": dict(D=128, Sq=3000, Hq=8, Hkv=2, window=512),
    "window_rows_outside": dict(D=64, Sq=1200, Sk=800, Hq=4, Hkv=1, window=100),
    "window_bidir": dict(D=128, Sq=1000, Hq=4, Hkv=2, window=300, causal=False),
    "softcap_sinks": dict(D=256, Sq=800, Hq=4, Hkv=2, softcap=30.0, sinks=True),
    "sinks_window_gqa8": dict(D=64, Sq=1500, Hq=8, Hkv=1, sinks=True, window=128),
    "packed": dict(D=128, B=1, Sq=3000, Hq=8, Hkv=2, segments=[[0, 0, 1000, 0, 1000], [0, 1000, 1000, 1000, 1000],
                                                                [0, 1000, 2999, 1000, 2999]]),
    "left_pad": dict(D=128, B=3, Sq=1024, Hq=4, Hkv=2, segments=[[0, 100, 1024, 100, 1024], [1, 0, 1024, 0, 1024],
                                                                 [2, 1023, 1024, 1023, 1024]]),
    "everything": dict(D=96, B=2, Sq=700, Sk=1500, Hq=8, Hkv=2, sinks=True, softcap=20.0, window=200,
                       q_transposed=True, kv_transposed=True,
                       segments=[[0, 0, 700, 0, 1500], [1, 50, 650, 100, 1000], [1, 650, 650, 1000, 1000]]),
    "long_16k": dict(D=128, Sq=16384, Hq=2, Hkv=1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_bf16(flash_gpu, case):
    run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, **GPU_CASES[case])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(flash_gpu, dtype):
    run_case(flash_gpu, device="cuda", dtype=dtype, D=128, Sq=1000, Hq=4, Hkv=2, window=300, sinks=True)


@pytest.mark.gpu
def test_gpu_every_tuning_candidate(flash_gpu, monkeypatch):
    """Each candidate config (not just the default) computes the right thing."""
    for i, forced in each_candidate(monkeypatch, (128, 256, 64)):
        for D, kw in ((128, dict(Sq=1100, Sk=1300, Hq=4, Hkv=2, window=400)), (256, dict(Sq=300, Hq=2, Hkv=1)),
                      (64, dict(Sq=700, Hq=4, Hkv=1))):
            try:
                run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, **kw)
            except AssertionError as exc:
                used = {kind: forced(kind, D)[0] for kind in KERNEL_KINDS}
                pytest.fail(f"candidate #{i} at D={D} {used}: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [160, 192, 256])
@pytest.mark.parametrize("case", ["causal_gqa", "segments_with_empty", "everything_fp16", "dropout_gqa_window",
                                  "q_longer_than_k"])
def test_gpu_two_pass_dkdv(flash_gpu, monkeypatch, D, case):
    """The two-pass dK/dV candidates (the 256 bucket's: wgmma tiles, compiled), bf16 unless the case says fp16, at
    padded (160, 192) and full (256) head dims, every feature."""
    from hf_attn_plugin.kernels import configs

    kw = dict(dict(dtype=torch.bfloat16), **TWO_PASS_CASES[case], D=D)
    for cfg in [c for c in configs._GPU[("bwd_dkdv", 256)] if c.two_pass]:
        monkeypatch.setattr(configs, "candidates", lambda kind, block_d, cfg=cfg: (
            (cfg,) if kind == "bwd_dkdv" else configs._GPU[(kind, configs._dim_bucket(block_d))][:1]))
        passes = _record_dkdv_passes(monkeypatch)
        try:
            run_case(flash_gpu, device="cuda", **kw)
        except AssertionError as exc:
            pytest.fail(f"{cfg}: {exc}")
        assert passes == [(False, True), (True, False)]
        monkeypatch.undo()


@pytest.mark.gpu
def test_gpu_layers_after_the_first_relaunch_the_compiled_kernels(flash_gpu, monkeypatch):
    """Layers of one shape (a forward + backward per layer): the first launch of each Triton kernel goes through the
    JIT, the next layers launch the kernel it compiled directly (host time: kernels/host.py). Other strides (q
    transposed, as transformers hands it over) are a new key: the JIT once more. Every layer against the oracles."""
    from hf_attn_plugin.kernels import host

    monkeypatch.setenv("HF_ATTN_PLUGIN_GLUON", "0")  # the Triton kernels, whatever the tables name
    monkeypatch.setattr(host, "_RELAUNCHERS", {})
    names = ("_attn_fwd", "_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv")
    jit = {name: 0 for name in names}
    for name in names:
        spy_launches(monkeypatch, flash_gpu, name, lambda args, kwargs, name=name: jit.__setitem__(name, jit[name] + 1))
    case = dict(device="cuda", dtype=torch.bfloat16, D=64, Sq=300, Hq=8, Hkv=2, window=100, sinks=True)
    run_case(flash_gpu, **case)
    first = dict(jit)
    assert all(first.values()), first
    for _layer in range(2):
        run_case(flash_gpu, **case)
    assert jit == first
    run_case(flash_gpu, q_transposed=True, **case)
    assert jit["_attn_fwd"] == 2 * first["_attn_fwd"]


@pytest.fixture
def gluon_ran(monkeypatch):
    """The ``warp_spec`` of every Gluon forward launched (through flash_attn_forward's dispatch), with NaN-poisoned
    outputs so that every element must be written."""
    from hf_attn_plugin.kernels import gluon_fwd

    ran = []
    real = gluon_fwd.gluon_attn_forward

    def spy(*args, warp_spec=0, **kwargs):
        ran.append(warp_spec)
        return real(*args, warp_spec=warp_spec, **kwargs)

    monkeypatch.setattr(gluon_fwd, "gluon_attn_forward", spy)
    monkeypatch.setattr(gluon_fwd, "POISON", True)
    return ran


def _force_fwd(monkeypatch, cfg):
    """Forward candidates = (cfg,) (so pick returns it), the backward kernels at their defaults."""
    from hf_attn_plugin.kernels import configs

    monkeypatch.setattr(configs, "candidates", lambda kind, block_d: (
        (cfg,) if kind == "fwd" else configs._GPU[(kind, configs._dim_bucket(block_d))][:1]))


def _gluon_candidates(D):
    from hf_attn_plugin.kernels import configs

    return [c for c in configs._GPU[("fwd", D)] if c.gluon >= 0]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", ["causal_gqa4", "bidir_ragged_transposed", "fp16_q_longer"])
def test_gpu_every_gluon_candidate_through_the_forward(flash_gpu, monkeypatch, gluon_ran, D, shape):
    """Each Gluon forward candidate, forced as the forward's config, runs the Gluon kernel (forward) and the Triton
    backward, both within the FA2 rule of the oracles (tests/test_gluon_fwd.py covers the kernel itself)."""
    kw = {"causal_gqa4": dict(Sq=1000, Hq=8, Hkv=2),
          "bidir_ragged_transposed": dict(B=2, Sq=333, Sk=700, Hq=4, Hkv=4, causal=False, q_transposed=True,
                                          kv_transposed=True),
          "fp16_q_longer": dict(Sq=500, Sk=300, Hq=6, Hkv=2, dtype=torch.float16)}[shape]
    for cfg in _gluon_candidates(D):
        _force_fwd(monkeypatch, cfg)
        del gluon_ran[:]
        try:
            run_case(flash_gpu, device="cuda", **dict(dict(dtype=torch.bfloat16, D=D), **kw))
        except AssertionError as exc:
            pytest.fail(f"{cfg} D={D} {kw}: {exc}")
        assert gluon_ran == [cfg.gluon], f"{cfg}: the Gluon forward did not run ({gluon_ran})"


GLUON_FALLBACK_CASES = {
    "window": dict(D=128, Sq=600, Hq=4, Hkv=2, window=100),
    "softcap_sinks": dict(D=64, Sq=500, Hq=4, Hkv=2, softcap=20.0, sinks=True),
    "segments": dict(D=128, B=2, Sq=300, Hq=4, Hkv=2, segments=[[0, 50, 300, 50, 300], [1, 0, 300, 0, 300]]),
    "dropout": dict(D=64, Sq=300, Hq=2, Hkv=1, dropout_p=0.1),
    "fp32": dict(D=128, Sq=300, Hq=4, Hkv=2, dtype=torch.float32),
    "head_dim_96": dict(D=96, Sq=400, Hq=4, Hkv=2),  # the 128 bucket, but not a Gluon head dim
    "switched_off": dict(D=64, Sq=400, Hq=4, Hkv=2),  # plain, with HF_ATTN_PLUGIN_GLUON=0
}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", list(GLUON_FALLBACK_CASES))
def test_gpu_gluon_config_falls_back_to_triton_where_unsupported(flash_gpu, monkeypatch, gluon_ran, case):
    """A Gluon config picked for a call the Gluon kernel cannot run: the Triton kernel (the key's Triton config,
    here the default: the forced candidate list has no other) computes it, the Gluon kernel is never launched."""
    from hf_attn_plugin.kernels import configs

    kw = dict(dict(dtype=torch.bfloat16), **GLUON_FALLBACK_CASES[case])
    if case == "switched_off":
        monkeypatch.setenv("HF_ATTN_PLUGIN_GLUON", "0")
    for cfg in _gluon_candidates(configs._dim_bucket(kw["D"])):
        _force_fwd(monkeypatch, cfg)
        run_case(flash_gpu, device="cuda", **kw)
        assert gluon_ran == [], f"{cfg} {case}: the Gluon forward ran for a call it does not support"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("D,variant", [(128, 3), (64, 2)])
def test_gpu_gluon_forward_triton_backward_autograd(flash_gpu, monkeypatch, gluon_ran, D, variant):
    """ops.attention with autograd, forward by the Gluon kernel (forced config), backward by the Triton kernels
    from its lse: out and the q/k/v gradients within the FA2 rule of the oracles."""
    from hf_attn_plugin import ops

    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    _force_fwd(monkeypatch, next(c for c in _gluon_candidates(D) if c.gluon == variant))
    B, S, Hq, Hkv = 2, 700, 8, 2
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = ops.attention(q, k, v, causal=True)
    assert gluon_ran == [variant]
    dout = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), dout)]

    def oracle(dt, compute_dtype=None):
        xs = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = reference.attention_reference(*xs, causal=True, compute_dtype=compute_dtype)[0]
        return [o, *torch.autograd.grad(o, xs, dout.to(dt))]

    ref = oracle(torch.float64)
    low = oracle(torch.bfloat16, compute_dtype=torch.bfloat16)
    for name, g, r, lo in zip(("out", "dq", "dk", "dv"), got, ref, low):
        assert_fa2_rule(g, r, lo, name)


@pytest.mark.gpu
def test_gpu_autograd_backward_thread_with_descriptors(flash_gpu, monkeypatch):
    """Autograd runs the backward in its own thread, where Triton has no allocator unless we set one: the
    warp-specialized dK/dV builds TMA descriptors there (a model benchmark caught this)."""
    from hf_attn_plugin import ops
    from hf_attn_plugin.kernels import configs

    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    ws = next(c for c in configs._GPU[("bwd_dkdv", 128)] if c.warp_spec)
    monkeypatch.setattr(configs, "candidates", lambda kind, block_d: (
        (ws,) if kind == "bwd_dkdv" else configs._GPU[(kind, configs._dim_bucket(block_d))][:1]))
    q = torch.randn(1, 8, 900, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 900, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 900, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ops.attention(q, k, v, causal=True).float().square().sum().backward()
    xs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_reference(*xs, causal=True)
    ref.square().sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (x.grad for x in xs)):
        assert (got.float() - want).abs().max() <= 0.02 * want.abs().max() + 1e-3


@pytest.mark.gpu
def test_gpu_int64_offsets(flash_gpu):
    """B*S*H*D >= 2^31 elements: the last batch row must still be right."""
    B, S, Hq, Hkv, D = 130, 2048, 64, 8, 128
    assert B * S * Hq * D >= 2**31
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    params = AttentionParams.create(D)
    out, lse = flash_gpu.flash_attn_forward(q, k, v, params)
    dout = torch.randn_like(out)
    dq, dk, dv, _ = flash_gpu.flash_attn_backward(dout, q, k, v, out, lse, params)
    for b in (0, B - 1):
        xs = [t[b:b + 1].float().requires_grad_() for t in (q, k, v)]
        ro, rl = reference.attention_reference(*xs, causal=True)
        g = torch.autograd.grad(ro, xs, dout[b:b + 1].float())
        for got, ref in zip((out, lse, dq, dk, dv), (ro, rl) + g):
            got = got[b:b + 1].float()
            assert torch.isfinite(got).all()
            assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3
    del q, k, v, out, dq, dk, dv
    torch.cuda.empty_cache()


def _attn_fn(q, k, v, sinks):
    from hf_attn_plugin import ops

    return ops.attention(q, k, v, causal=True, window=256, sinks=sinks, softcap=30.0)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(flash_gpu, monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q = torch.randn(2, 8, 600, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 600, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 600, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(8, device="cuda", requires_grad=True)

    def step(q, k, v, sinks):
        out = _attn_fn(q, k, v, sinks)
        return (out.float() ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(loss, (q, k, v, sinks))
    ref_loss = step(q, k, v, sinks)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, sinks))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)  # same kernels, deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("gluon", [-1, 3], ids=["table", "gluon_ws3"])
def test_gpu_cuda_graph_forward(flash_gpu, monkeypatch, gluon):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    if gluon >= 0:  # the Gluon forward (host-built TMA descriptors) captured and replayed
        if not HAS_HOPPER:
            pytest.skip("needs an sm_90 GPU")
        _force_fwd(monkeypatch, next(c for c in _gluon_candidates(128) if c.gluon == gluon))
    q = torch.randn(2, 700, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 700, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 700, 2, 128, device="cuda", dtype=torch.bfloat16)
    from hf_attn_plugin import ops

    with torch.no_grad():
        expected = ops.attention(q, k, v, causal=True)  # warm-up: compiles and tunes outside capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.attention(q, k, v, causal=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ops.attention(q, k, v, causal=True)
        for _ in range(2):
            q.copy_(torch.randn_like(q))
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(static_out, ops.attention(q, k, v, causal=True), rtol=0, atol=0)
        assert not torch.equal(static_out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("features", ["plain", "all", "dropout"])
def test_gpu_opcheck(flash_gpu, monkeypatch, features):
    from hf_attn_plugin import ops

    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q = torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 300, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if features == "plain":
        args = (q, k, v, None, None, 0.125, True, 0, 0.0, 300, 300)
    else:
        seg = torch.tensor([[0, 0, 100, 0, 120], [0, 120, 300, 120, 300]], dtype=torch.int32, device="cuda")
        sinks = torch.randn(4, device="cuda", requires_grad=True)
        args = (q, k, v, seg, sinks, 0.125, True, 64, 20.0, 180, 180)
        if features == "dropout":
            args += (0.1, ops.dropout_seed("cuda"))
    torch.library.opcheck(ops._attention_fwd, args)
    out, lse = ops._attention_fwd(*args)
    # the backward op has no autograd of its own (no double backward): its inputs must not need grad
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach()) + tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:])
    torch.library.opcheck(ops._attention_bwd, bwd_args)
