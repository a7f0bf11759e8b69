"""The experimental Gluon (Hopper) forward, hf_attn_plugin/kernels/gluon_fwd.py, vs the reference.

Error rule as tests/test_flash_kernels.py (FA2's): ``err(kernel vs fp64 reference) <= 2 * err(PyTorch at the
kernel's dtype vs fp64 reference) + 1e-5`` (max abs), for out and lse. GPU tests need an sm_90 GPU and
Triton 3.6 (``pytest -m gpu``); the CPU tests only check that the module imports and refuses what it cannot run.
"""

from __future__ import annotations

import pytest
import torch

from hf_attn_plugin import reference
from hf_attn_plugin.kernels import gluon_fwd
from hf_attn_plugin.ops import AttentionParams
from tests.helpers import assert_fa2_rule, needs_hopper


def _run(*, B=2, Sq=256, Sk=None, Hq=4, Hkv=2, D=64, causal=True, dtype=torch.bfloat16, q_transposed=False,
         kv_transposed=False, warp_spec=0):
    Sk = Sq if Sk is None else Sk
    scale = D**-0.5
    if q_transposed:  # what transformers hands over: a [B, S, H, D] view of [B, H, S, D] memory
        q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype)
    if kv_transposed:
        k = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype)
        v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype)

    old, gluon_fwd.POISON = gluon_fwd.POISON, True  # NaN-filled outputs: every element must be written
    try:
        out, lse = gluon_fwd.gluon_attn_forward(q, k, v, AttentionParams(scale, causal), warp_spec=warp_spec)
    finally:
        gluon_fwd.POISON = old
    torch.cuda.synchronize()
    assert out.shape == (B, Sq, Hq, D) and out.dtype == dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert not out.isnan().any(), f"{out.isnan().sum().item()} output elements unwritten or NaN"
    assert not lse.isnan().any(), f"{lse.isnan().sum().item()} lse elements unwritten or NaN"

    ref_out, ref_lse = reference.attention_reference(q.double(), k.double(), v.double(), scale=scale, causal=causal)
    low_out, low_lse = reference.attention_reference(q, k, v, scale=scale, causal=causal, compute_dtype=dtype)
    for name, got, ref, low in (("out", out, ref_out, low_out), ("lse", lse, ref_lse, low_lse)):
        assert_fa2_rule(got, ref, low, name)
    return out, lse


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S", [128, 256, 1000])
@pytest.mark.parametrize("warp_spec", [0, 1, 2, 3], ids=["ws0", "ws1_producer", "ws2_split", "ws3_pingpong"])
def test_head_dims_causal(D, causal, S, warp_spec):
    _run(D=D, causal=causal, Sq=S, warp_spec=warp_spec)



@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (9, 3), (8, 2), (8, 1)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("warp_spec", [0, 1, 2, 3], ids=["ws0", "ws1_producer", "ws2_split", "ws3_pingpong"])
def test_gqa(Hq, Hkv, D, causal, warp_spec):
    _run(B=1, Sq=384, Hq=Hq, Hkv=Hkv, D=D, causal=causal, warp_spec=warp_spec)



@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("S", [1, 17, 63, 127, 129, 200, 333, 640, 2049])  # ragged: not multiples of 128
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("warp_spec", [0, 1, 2, 3], ids=["ws0", "ws1_producer", "ws2_split", "ws3_pingpong"])
def test_ragged(S, causal, warp_spec):
    _run(B=2, Sq=S, D=128 if S % 2 else 64, causal=causal, warp_spec=warp_spec)



@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("Sq,Sk", [(1, 300), (100, 300), (300, 100), (257, 700), (700, 257)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("warp_spec", [0, 1, 2, 3], ids=["ws0", "ws1_producer", "ws2_split", "ws3_pingpong"])
def test_q_len_ne_kv_len(Sq, Sk, causal, warp_spec):
    """Bottom-right causal alignment; with Sq > Sk the first rows see no key: out 0, lse 0 (reference.py)."""
    out, lse = _run(Sq=Sq, Sk=Sk, causal=causal, warp_spec=warp_spec)
    if causal and Sq > Sk:
        blind = Sq - Sk  # rows i < Sq - Sk see no key
        assert (out[:, :blind] == 0).all() and (lse[:, :, :blind] == 0).all()



@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("warp_spec", [0, 1, 2, 3], ids=["ws0", "ws1_producer", "ws2_split", "ws3_pingpong"])
def test_fp16_and_strided_inputs(D, warp_spec):
    """fp16, and [B, S, H, D] views of [B, H, S, D] memory (what transformers passes): read in place by TMA."""
    _run(D=D, Sq=300, dtype=torch.float16, q_transposed=True, kv_transposed=True, warp_spec=warp_spec)


@pytest.mark.gpu
@needs_hopper
def test_misaligned_view_is_copied():
    """A view whose start is not 16-byte aligned cannot be a TMA base: the launcher must copy, not fail."""
    q = torch.randn(1, 65, 2, 64, device="cuda", dtype=torch.bfloat16)[:, 1:]
    flat = torch.randn(64 * 2 * 64 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(1, 64, 2, 64)
    assert flat.data_ptr() % 16 != 0
    out, _ = gluon_fwd.gluon_attn_forward(q, flat, flat, AttentionParams(0.125))
    ref, _ = reference.attention_reference(q.double(), flat.double(), flat.double(), scale=0.125, causal=True)
    assert (out.double() - ref).abs().max().item() < 2e-2



@pytest.mark.gpu
@needs_hopper
def test_refuses_what_it_cannot_run():
    q = torch.randn(1, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert gluon_fwd.unsupported_reason(q, k, k) is None
    for kwargs, word in ((dict(window=16), "window"), (dict(softcap=30.0), "softcap"), (dict(dropout_p=0.1), "dropout"),
                         (dict(sinks=torch.zeros(4, device="cuda")), "sinks"),
                         (dict(segments=torch.zeros(0, 5, dtype=torch.int32, device="cuda")), "segments")):
        with pytest.raises(NotImplementedError, match=f"this call uses {word}"):
            gluon_fwd.gluon_attn_forward(q, k, k, AttentionParams.create(64, **kwargs))
    q96 = torch.randn(1, 64, 4, 96, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="head_dim"):
        gluon_fwd.gluon_attn_forward(q96, q96[:, :, :2], q96[:, :, :2], AttentionParams(0.1))
    with pytest.raises(ValueError, match="warp_spec"):
        gluon_fwd.gluon_attn_forward(q, k, k, AttentionParams(0.125), warp_spec=4)
    with pytest.raises(NotImplementedError, match="bf16/fp16"):
        gluon_fwd.gluon_attn_forward(q.float(), k.float(), k.float(), AttentionParams(0.125))


def test_imports_without_gpu_and_refuses_cpu_tensors():
    """The module imports on any machine (no GPU, any Triton); CPU tensors get a NotImplementedError naming the
    fallback, so a dispatcher can catch it."""
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
    reason = gluon_fwd.unsupported_reason(q, k, k)
    assert reason is not None
    with pytest.raises(NotImplementedError) as info:
        gluon_fwd.gluon_attn_forward(q, k, k, AttentionParams(0.125))
    msg = str(info.value)
    assert "CUDA" in msg or "Gluon" in msg, msg


def test_gluon_configs_of_the_config_system_describe_the_kernel(monkeypatch):
    """The forward candidates with ``gluon`` >= 0 (kernels/configs.py) record this kernel's fixed launch shape."""
    from hf_attn_plugin.kernels import configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    for dim in gluon_fwd.SUPPORTED_HEAD_DIMS:
        found = [c for c in configs.candidates("fwd", dim) if c.gluon >= 0]
        assert [c.gluon for c in found] == [0, 1, 2, 3]
        for cfg in found:
            shape = gluon_fwd._config(dim, cfg.gluon)
            assert (cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps) == (
                shape["BLOCK_M"], shape["BLOCK_N"], shape["NUM_STAGES"], shape["num_warps"]), cfg
