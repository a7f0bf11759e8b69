"""Every head dim a Hugging Face model uses: multiples of 8 from 16 to 256 (issue 15 item 1).

CPU: the Triton interpreter, forward + backward at every listed D in fp32 and fp16 with every feature at once
(GQA, sliding window, softcap, sinks, segments, a transposed q), FA2's error rule (``run_case``). GPU (``-m gpu``):
bf16 at every D with every feature, and every tuning candidate of every D bucket at the new dims.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_attn_plugin.ops import AttentionParams  # noqa: E402

from .helpers import KERNEL_KINDS, each_candidate, needs_kernels  # noqa: E402
from .test_flash_kernels import CACHE, PACKED, run_case  # noqa: E402

HEAD_DIMS = [16, 32, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256]
# every feature at once; a packed segment list with an empty segment, bottom-right aligned cache rows
EVERYTHING = dict(sinks=True, softcap=5.0, window=21, segments=CACHE, B=2, Sq=64, Sk=90, Hq=4, Hkv=2,
                  q_transposed=True)


def test_supported_set_is_every_multiple_of_8_from_16_to_256():
    from hf_attn_plugin.kernels import flash

    assert flash.SUPPORTED_HEAD_DIMS == tuple(range(16, 257, 8))
    assert set(HEAD_DIMS) <= set(flash.SUPPORTED_HEAD_DIMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_every_head_dim_everything(flash_cpu, D, dtype):
    run_case(flash_cpu, D=D, dtype=dtype, **EVERYTHING)


@pytest.mark.parametrize("D", [16, 48, 72, 112, 160, 192])
def test_every_head_dim_plain_packed(flash_cpu, D):
    """No mask flags but packing (unmasked bulk phases at odd D), MQA."""
    run_case(flash_cpu, D=D, segments=PACKED, Sq=100, Hq=4, Hkv=1, causal=False)


@pytest.mark.parametrize("D", [16, 72, 160])
def test_every_head_dim_warp_specialized(flash_cpu, monkeypatch, D):
    """The warp-specialized forms (Q and dO through 3-D TMA descriptors) at head dims below / between powers of 2."""
    from hf_attn_plugin.kernels import configs

    monkeypatch.setitem(configs._INTERPRET, "fwd", configs.Config(32, 16, 4, 1, warp_spec=True))
    monkeypatch.setitem(configs._INTERPRET, "bwd_dkdv", configs.Config(16, 32, 4, 1, warp_spec=True))
    run_case(flash_cpu, D=D, dtype=torch.float16, **EVERYTHING)


@pytest.mark.parametrize("D", [8, 12, 20, 100, 264, 512])
def test_unsupported_head_dims_are_refused_clearly(D):
    from hf_attn_plugin.kernels import flash

    q = torch.randn(1, 8, 2, D)
    with pytest.raises(ValueError, match=rf"head_dim {D} is not supported .* every multiple of 8 from 16 to 256"):
        flash.flash_attn_forward(q, q, q, AttentionParams(0.1))
    with pytest.raises(ValueError, match=rf"head_dim {D} is not supported"):
        flash.flash_attn_backward(q, q, q, q, q, q[..., 0].transpose(1, 2), AttentionParams(0.1))


# ---------------------------------------------------------------------------------------------- paged kernels


@needs_kernels
@pytest.mark.parametrize("D", [16, 48, 72, 112, 160, 192])
def test_paged_decode_and_prefill_every_head_dim(D):
    from .test_paged import DEV, _check, _random_paged

    k_pool, v_pool, bt, seq_lens, _ = _random_paged([9, 70], 2, D, 16, torch.float32)
    q = torch.randn(2, 4, D, device=DEV)
    _check(q, k_pool, v_pool, bt, seq_lens, window=40, softcap=3.0, sinks=torch.randn(4, device=DEV), num_splits=2)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEV)
    q = torch.randn(12, 4, D, device=DEV)
    _check(q, k_pool, v_pool, bt, seq_lens, cu=cu, max_q=7)


@pytest.mark.parametrize("D", [8, 44, 264])
def test_paged_refuses_unsupported_head_dims(D):
    from hf_attn_plugin.kernels import paged

    q = torch.randn(1, 2, D)
    pool = torch.randn(1, 16, 2, D)
    with pytest.raises(ValueError, match=rf"head_dim {D} is not supported by the Triton paged kernels"):
        paged.paged_attention(q, pool, pool, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                              None, 1, None, None, 0.1, True, 0, 0.0, 1)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gpu_every_head_dim_bf16(flash_gpu, D):
    run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, sinks=True, softcap=30.0, window=300,
             segments=[[0, 10, 700, 0, 900], [1, 0, 500, 0, 500], [1, 500, 520, 500, 530]], B=2, Sq=700, Sk=900,
             Hq=8, Hkv=2, q_transposed=True)
    run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, Sq=1000, Hq=4, Hkv=4, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("D", [16, 48, 72, 160, 192])
def test_gpu_new_head_dims_other_dtypes(flash_gpu, D, dtype):
    """fp32 (ieee dots, 4-byte TMA rows) and fp16 at the head dims that are not powers of two or below 64."""
    run_case(flash_gpu, device="cuda", dtype=dtype, D=D, Sq=600, Hq=4, Hkv=2, window=250, sinks=True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [16, 32, 48, 72, 112, 160, 192])
def test_gpu_every_tuning_candidate_new_head_dims(flash_gpu, monkeypatch, D):
    """Every candidate config of D's bucket compiles, runs and is right (bf16, every feature)."""
    block_d = max(1 << (D - 1).bit_length(), 16)
    for i, forced in each_candidate(monkeypatch, (block_d,)):
        try:
            run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, Sq=500, Sk=650, Hq=4, Hkv=2, window=200,
                     sinks=True, softcap=20.0)
        except AssertionError as exc:
            used = {kind: forced(kind, block_d)[0] for kind in KERNEL_KINDS}
            pytest.fail(f"candidate #{i} at D={D} {used}: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("D", [16, 48, 72, 160, 192])
def test_gpu_paged_new_head_dims(D):
    from .test_paged import _check, _random_paged

    k_pool, v_pool, bt, seq_lens, _ = _random_paged([300, 2000], 2, D, 16, torch.bfloat16)
    _check(torch.randn(2, 8, D, device="cuda").bfloat16(), k_pool, v_pool, bt, seq_lens, sinks=torch.randn(8, device="cuda"),
           window=500, num_splits=4)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    _check(torch.randn(300, 8, D, device="cuda").bfloat16(), k_pool, v_pool, bt, seq_lens, cu=cu, max_q=200)


@pytest.mark.gpu
def test_gpu_backward_at_d72_runs_at_the_speed_of_its_bucket():
    """D 72 and D 80 share a head-dim bucket (tiles 128 wide, the same launch configs), so their backward takes about
    the same time. Before the kernels told the compiler that strides are 16-byte multiples, a head stride of 72
    elements (not a multiple of 16: Triton leaves it unmarked) turned every row load into scalar loads: dK/dV 5.3x
    and dQ 5.3x slower than at D 80 on the H200 (3.59 vs 0.68 ms, 2.29 vs 0.43 ms at B 8, S 2k, 16 heads)."""
    from triton.testing import do_bench

    from hf_attn_plugin import ops

    def backward(d):
        q, k, v = (torch.randn(4, 2048, 16, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out = ops.attention(q, k, v, causal=True)
        grad = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    # Alternating rounds, the fastest of each: the GPU suite runs on one GPU from many processes, so a single
    # measurement can land beside another test's kernels (seen: D 72 1.21 ms vs D 80 0.79 ms in one such run).
    runs, times = {d: backward(d) for d in (72, 80)}, {72: [], 80: []}
    for _ in range(3):
        for d in (72, 80):
            times[d].append(do_bench(runs[d], warmup=5, rep=40))
    d72, d80 = min(times[72]), min(times[80])
    assert d72 < 1.5 * d80, f"backward at D 72 takes {d72:.3f} ms, at D 80 {d80:.3f} ms"
