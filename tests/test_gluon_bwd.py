"""The Gluon (Hopper) dK/dV backward, hf_attn_plugin/kernels/gluon_bwd.py, and its dispatch in flash_attn_backward.

Error rule (FA2's, tests/helpers.assert_fa2_rule): ``err(kernel vs fp64 reference) <= 2 * err(PyTorch at the
kernel's dtype vs fp64 reference) + 1e-5`` (max abs) for dk, dv (and dq, out, lse through the whole backward).
GPU tests need an sm_90 GPU and Triton 3.6 (``pytest -m gpu``); on failure they print where the error sits (per key
tile of 128 rows and per kv head) so that one GPU run is enough to locate a layout or barrier bug. The CPU tests
check the module's refusals and the config plumbing.
"""

from __future__ import annotations

import sys

import pytest
import torch

from hf_attn_plugin import reference
from hf_attn_plugin.kernels import configs, gluon_bwd
from hf_attn_plugin.kernels.params import AttentionParams
from tests.helpers import max_abs_error, needs_hopper
from tests.test_flash_kernels import GLUON_FALLBACK_CASES, run_case

WS_IDS = ["ws0", "ws1_producer", "ws2_split"]


def _where(got: torch.Tensor, ref: torch.Tensor, block: int = 128) -> str:
    """Diagnostics for a [B, Sk, Hkv, D] gradient: NaN count and max error per key tile and per kv head."""
    err = (got.double() - ref.double()).abs()
    nan = got.isnan()
    tiles = []
    for t0 in range(0, got.shape[1], block):
        e = err[:, t0:t0 + block]
        tiles.append(f"keys {t0}-{min(t0 + block, got.shape[1]) - 1}: max {e.nan_to_num(float('inf')).max().item():.2e}"
                     f" nan {int(nan[:, t0:t0 + block].sum())}")
    heads = [f"{err[:, :, h].nan_to_num(float('inf')).max().item():.2e}" for h in range(got.shape[2])]
    rows = err.nan_to_num(float("inf")).amax(dim=(0, 2, 3))
    worst = rows.topk(min(4, rows.numel())).indices.tolist()
    return (f"{int(nan.sum())} NaN of {got.numel()}; per key tile: {'; '.join(tiles[:16])}; per kv head: "
            f"{', '.join(heads)}; worst key rows {worst}; |ref| max {ref.double().abs().max().item():.2e}")


def _direct(*, B=1, Sq=256, Sk=None, Hq=4, Hkv=4, D=64, causal=True, dtype=torch.bfloat16, warp_spec=0,
            misaligned_stats=False):
    """The kernel alone: forward by flash_attn_forward (whatever it picks), delta in PyTorch, dk/dv NaN-filled
    before the launch (every element must be written), checked against the reference backward.
    ``misaligned_stats``: lse and delta handed over as views 4 bytes into a buffer (the launcher must copy them)."""
    from hf_attn_plugin.kernels import flash

    Sk = Sq if Sk is None else Sk
    q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype)
    params = AttentionParams.create(D, causal=causal)
    out, lse = flash.flash_attn_forward(q, k, v, params)
    dout = torch.randn_like(out)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    lse = lse.contiguous()
    if misaligned_stats:
        lse, delta = (torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape) for t in (lse, delta))
        assert lse.data_ptr() % 16 and delta.data_ptr() % 16
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    gluon_bwd.gluon_attn_backward_dkdv(dout, q, k, v, lse, delta, dk, dv, params, warp_spec=warp_spec)
    torch.cuda.synchronize()
    _, ref_dk, ref_dv, _ = reference.attention_reference_backward(dout.double(), q.double(), k.double(), v.double(),
                                                                  params)
    _, low_dk, low_dv, _ = reference.attention_reference_backward(dout, q, k, v, params, compute_dtype=dtype)
    label = f"B{B} Sq{Sq} Sk{Sk} {Hq}/{Hkv} D{D} causal={causal} {dtype} warp_spec={warp_spec}"
    for name, got, ref, low in (("dk", dk, ref_dk, low_dk), ("dv", dv, ref_dv, low_dv)):
        err, base = max_abs_error(got.nan_to_num(float("inf")), ref), max_abs_error(low, ref)
        assert not got.isnan().any() and err <= 2 * base + 1e-5, (
            f"{label}: {name} err {err:.3e} > 2 * {base:.3e} + 1e-5 (FA2 rule) or unwritten; {_where(got, ref)}")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("warp_spec", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("S", [4, 100, 128, 1000, 2048])  # Sq % 4 == 0: the kernel's subset
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa4", "gqa8"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel(D, causal, Hq, Hkv, S, warp_spec):
    _direct(B=2 if S <= 128 else 1, Sq=S, Hq=Hq, Hkv=Hkv, D=D, causal=causal, warp_spec=warp_spec)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("warp_spec", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("Sq,Sk", [(4, 300), (100, 300), (300, 100), (260, 700), (700, 257), (64, 2048)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_q_len_ne_kv_len(D, causal, Sq, Sk, warp_spec):
    """Bottom-right causal alignment; with Sq > Sk the first rows see no key (lse 0: they must add nothing)."""
    _direct(B=2, Sq=Sq, Sk=Sk, Hq=8, Hkv=2, D=D, causal=causal, warp_spec=warp_spec)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("warp_spec", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_fp16(D, warp_spec):
    _direct(B=2, Sq=700, Hq=8, Hkv=2, D=D, causal=True, dtype=torch.float16, warp_spec=warp_spec)
    _direct(B=1, Sq=332, Sk=500, Hq=4, Hkv=4, D=D, causal=False, dtype=torch.float16, warp_spec=warp_spec)


@pytest.mark.gpu
@needs_hopper
def test_kernel_misaligned_lse_and_delta():
    """lse/delta go through 1-D TMA descriptors, which need a 16-byte aligned base: the launcher copies."""
    _direct(B=1, Sq=300, Hq=4, Hkv=2, D=64, causal=True, misaligned_stats=True)


@pytest.fixture
def gluon_bwd_ran(monkeypatch):
    """The ``warp_spec`` of every Gluon dK/dV launch made through flash_attn_backward's dispatch."""
    ran = []
    real = gluon_bwd.gluon_attn_backward_dkdv

    def spy(*args, warp_spec=0, **kwargs):
        ran.append(warp_spec)
        return real(*args, warp_spec=warp_spec, **kwargs)

    monkeypatch.setattr(gluon_bwd, "gluon_attn_backward_dkdv", spy)
    return ran


def _gluon_bwd_candidates(D):
    return [c for c in configs._GPU[("bwd_dkdv", D)] if c.gluon >= 0]


def _force_dkdv(monkeypatch, cfg):
    """dK/dV candidates = (cfg,) (so pick returns it), the other kernels at their defaults."""
    monkeypatch.setattr(configs, "candidates", lambda kind, block_d: (
        (cfg,) if kind == "bwd_dkdv" else configs._GPU[(kind, configs._dim_bucket(block_d))][:1]))


BACKWARD_CASES = {
    "causal_gqa4": dict(Sq=1000, Hq=8, Hkv=2),
    "bidir_ragged_transposed": dict(B=2, Sq=332, Sk=701, Hq=4, Hkv=4, causal=False, q_transposed=True,
                                    kv_transposed=True),
    "fp16_q_longer": dict(Sq=500, Sk=300, Hq=6, Hkv=2, dtype=torch.float16),
    "mqa_2k": dict(Sq=2048, Hq=8, Hkv=1),
}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("variant", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
@pytest.mark.parametrize("D", [64, 128])
def test_every_gluon_candidate_through_the_backward(flash_gpu, monkeypatch, gluon_bwd_ran, D, case, variant):
    """Each Gluon dK/dV candidate, forced as the dK/dV config, runs in flash_attn_backward (NaN-poisoned outputs)
    beside the Triton dQ: out, lse, dq, dk, dv within the FA2 rule of the oracles."""
    kw = dict(dict(dtype=torch.bfloat16, D=D), **BACKWARD_CASES[case])
    cfg = next(c for c in _gluon_bwd_candidates(D) if c.gluon == variant)
    _force_dkdv(monkeypatch, cfg)
    try:
        run_case(flash_gpu, device="cuda", **kw)
    except AssertionError as exc:
        pytest.fail(f"{cfg} {kw}: {exc}")
    assert gluon_bwd_ran == [cfg.gluon], f"{cfg}: the Gluon dK/dV kernel did not run ({gluon_bwd_ran})"


FALLBACK_CASES = {
    **GLUON_FALLBACK_CASES,  # the Gluon forward's refusals (window, softcap + sinks, segments, dropout, fp32, ...)
    # Sq % 4 != 0: lse/delta TMA boxes would start unaligned (on the H200 that was an illegal instruction, which
    # kills the process): these must run the Triton dK/dV kernel
    "sq_1": dict(D=64, B=2, Sq=1, Sk=300, Hq=4, Hkv=2),
    "sq_257": dict(D=128, Sq=257, Sk=700, Hq=8, Hkv=2),
    "sq_333_fp16": dict(D=64, Sq=333, Hq=4, Hkv=4, causal=False, dtype=torch.float16),
}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_gluon_bwd_config_falls_back_to_triton_where_unsupported(flash_gpu, monkeypatch, gluon_bwd_ran, case):
    """A Gluon dK/dV config picked for a call it cannot run: the Triton dK/dV kernel computes it."""
    kw = dict(dict(dtype=torch.bfloat16), **FALLBACK_CASES[case])
    if case == "switched_off":
        monkeypatch.setenv("HF_ATTN_PLUGIN_GLUON", "0")
    for cfg in _gluon_bwd_candidates(configs._dim_bucket(kw["D"])):
        _force_dkdv(monkeypatch, cfg)
        run_case(flash_gpu, device="cuda", **kw)
        assert gluon_bwd_ran == [], f"{cfg} {case}: the Gluon dK/dV kernel ran for a call it does not support"


# ---------------------------------------------------------------------------------------------- CPU
def test_imports_without_gpu_and_refuses_cpu_tensors():
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
    reason = gluon_bwd.unsupported_reason(q, k, k)
    assert reason is not None and "Gluon dK/dV" in reason and ("CUDA" in reason or "Triton" in reason), reason
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(NotImplementedError, match="Gluon dK/dV"):
        gluon_bwd.gluon_attn_backward_dkdv(q, q, k, k, lse, lse, torch.empty_like(k), torch.empty_like(k),
                                           AttentionParams(0.125))
    with pytest.raises(ValueError, match="warp_spec"):
        gluon_bwd.gluon_attn_backward_dkdv(q, q, k, k, lse, lse, torch.empty_like(k), torch.empty_like(k),
                                           AttentionParams(0.125), warp_spec=3)


def test_dkdv_candidates_describe_the_kernel(monkeypatch):
    """The ("bwd_dkdv", 64/128) candidates with ``gluon`` >= 0 record gluon_bwd's fixed launch shape, come after
    every Triton candidate (the default stays Triton) and exist only in the 64 and 128 buckets."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    for dim in (64, 128, 256):
        options = configs.candidates("bwd_dkdv", dim)
        found = [c for c in options if c.gluon >= 0]
        if dim not in gluon_bwd.SUPPORTED_HEAD_DIMS:
            assert not found
            continue
        assert [c.gluon for c in found] == list(gluon_bwd.WARP_SPEC_VARIANTS)
        assert options[0].gluon < 0 and all(c.gluon >= 0 for c in options[len(options) - len(found):])
        for cfg in found:
            shape = gluon_bwd._config(dim, cfg.gluon)
            assert (cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps) == (
                shape["BLOCK_M"], shape["BLOCK_N"], shape["NUM_STAGES"], shape["num_warps"]), cfg


def test_gluon_bwd_config_falls_back_to_triton_without_importing_gluon(flash_cpu, monkeypatch):
    """A Gluon dK/dV config picked under the interpreter (or for CPU tensors): the backward asks again for the key's
    Triton config and runs it, never importing the Gluon modules (blocked here); results within the FA2 rule."""
    from hf_attn_plugin import kernels

    for name in ("gluon_fwd", "gluon_bwd"):
        monkeypatch.delattr(kernels, name, raising=False)
        monkeypatch.setitem(sys.modules, f"hf_attn_plugin.kernels.{name}", None)  # any import raises ImportError
    asked = []
    real = configs.pick

    def pick(kind, block_d, key, launch=None, *, triton_only=False):
        asked.append((kind, triton_only))
        if kind == "bwd_dkdv" and not triton_only:
            return configs.Config(64, 128, 8, 3, gluon=0)
        return real(kind, block_d, key, launch, triton_only=triton_only)

    monkeypatch.setattr(configs, "pick", pick)
    run_case(flash_cpu, Sq=70, Hq=4, Hkv=2, D=64)
    assert ("bwd_dkdv", False) in asked and ("bwd_dkdv", True) in asked
    assert asked.index(("bwd_dkdv", True)) == asked.index(("bwd_dkdv", False)) + 1


def test_unsupported_reason_names_the_features(monkeypatch):
    """On a (pretend) Hopper with Gluon: plain calls are accepted, each optional feature is refused by name."""
    from hf_attn_plugin.kernels import gluon_fwd

    if gluon_fwd.IMPORT_ERROR is not None:
        pytest.skip(f"this Triton has no Gluon: {gluon_fwd.IMPORT_ERROR!r}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    class FakeCuda(torch.Tensor):  # is_cuda without a GPU: only the checks run, nothing is launched
        @property
        def is_cuda(self):
            return True

    q = torch.randn(1, 64, 4, 64, dtype=torch.bfloat16).as_subclass(FakeCuda)
    k = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16).as_subclass(FakeCuda)
    assert gluon_bwd.unsupported_reason(q, k, k) is None
    assert gluon_bwd.unsupported_reason(q, k, k, AttentionParams.create(64, causal=False)) is None
    for kwargs, word in ((dict(window=16), "window"), (dict(softcap=30.0), "softcap"), (dict(dropout_p=0.1), "dropout"),
                         (dict(sinks=torch.zeros(4)), "sinks")):
        reason = gluon_bwd.unsupported_reason(q, k, k, AttentionParams.create(64, **kwargs))
        assert reason is not None and word in reason and "Gluon dK/dV" in reason, (kwargs, reason)
    q96 = torch.randn(1, 64, 4, 96, dtype=torch.bfloat16).as_subclass(FakeCuda)
    assert "head_dim" in gluon_bwd.unsupported_reason(q96, q96[:, :, :2], q96[:, :, :2])
    assert "bf16/fp16" in gluon_bwd.unsupported_reason(q.float(), k.float(), k.float())
    q_long = torch.randn(1, 336, 4, 64, dtype=torch.bfloat16).as_subclass(FakeCuda)
    for sq in (1, 2, 3, 5, 257, 333):  # 1-D TMA boxes of lse/delta must start 16-byte aligned
        reason = gluon_bwd.unsupported_reason(q_long[:, :sq], k, k)
        assert reason is not None and "Sq % 4" in reason, (sq, reason)
    assert gluon_bwd.unsupported_reason(q_long[:, :4], k, k) is None
    assert gluon_bwd.unsupported_reason(q_long[:, :336], k, k) is None


TIMING_SHAPES = [  # (B, S, Hq, Hkv, D, causal): issue 16's D64 row, D128 GQA, and non-causal
    (8, 2048, 9, 3, 64, True), (4, 4096, 32, 8, 64, True), (2, 8192, 32, 8, 128, True), (4, 2048, 16, 16, 128, False),
]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("shape", TIMING_SHAPES,
                         ids=lambda s: "B{}_S{}_{}x{}_D{}_{}".format(*s[:5], "causal" if s[5] else "bidir"))
def test_timing_report(flash_gpu, monkeypatch, shape):
    """Not a speed assertion: prints the whole backward's time with the dK/dV config the shipped table picks, the
    Triton default and each Gluon variant at one shape (dQ and preprocess at their defaults), for
    benchmarks/NOTES_gluon.md (run with ``-s``); fails only if a Gluon variant errors."""
    from triton.testing import do_bench

    monkeypatch.setattr(flash_gpu, "POISON", False)  # no NaN fills in the timed calls
    B, S, Hq, Hkv, D, causal = shape
    q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    params = AttentionParams.create(D, causal=causal)
    out, lse = flash_gpu.flash_attn_forward(q, k, v, params)
    dout = torch.randn_like(out)

    picked = {}  # kind -> the config flash_attn_backward launches without forcing (the shipped table's pick)
    real = configs.launch_fitting

    def spy(kind, block_d, key, cfg, launch, **kwargs):
        picked.setdefault(kind, cfg)
        return real(kind, block_d, key, cfg, launch, **kwargs)

    monkeypatch.setattr(configs, "launch_fitting", spy)
    flash_gpu.flash_attn_backward(dout, q, k, v, out, lse, params)
    monkeypatch.setattr(configs, "launch_fitting", real)

    flops = 2.5 * 4 * B * Hq * S * S * D * (0.5 if causal else 1.0)  # backward = 2.5x the forward's matmuls
    options = [("table", picked["bwd_dkdv"]), ("default", configs._GPU[("bwd_dkdv", D)][0])]
    options += [(f"gluon ws{c.gluon}", c) for c in _gluon_bwd_candidates(D)]
    lines = []
    for label, cfg in options:
        _force_dkdv(monkeypatch, cfg)
        try:
            ms = do_bench(lambda: flash_gpu.flash_attn_backward(dout, q, k, v, out, lse, params), warmup=5, rep=30,
                          return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a Triton config this GPU rejects is reported, not fatal
            if cfg.gluon >= 0:
                raise
            lines.append(f"  {label} {cfg}: {type(exc).__name__}")
            continue
        lines.append(f"  {label} {cfg}: whole backward {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    print(f"\n[gluon_bwd timing] B{B} S{S} {Hq}/{Hkv} D{D} causal={causal} bf16:\n" + "\n".join(lines), flush=True)
