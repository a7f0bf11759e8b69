"""The Gluon (Hopper) dK/dV backward, hf_attn_plugin/kernels/gluon_bwd.py, and its dispatch in flash_attn_backward.

Error rule (FA2's, tests/helpers.assert_fa2_rule): ``err(kernel vs fp64 reference) <= 2 * err(PyTorch at the
kernel's dtype vs fp64 reference) + 1e-5`` (max abs) for dk, dv (and dq, out, lse through the whole backward).
GPU tests need an sm_90 GPU and Triton 3.6 (``pytest -m gpu``); on failure they print where the error sits (per key
tile of 128 rows and per kv head) so that one GPU run is enough to locate a layout or barrier bug. The CPU tests
check the module's refusals, the config plumbing and the backward's padded lse/delta layout (any Sq: rows
``round_up(Sq, 4)`` floats apart) through the Triton kernels under the interpreter.

Quick GPU check of any Sq (Sq % 4 in {1, 2, 3}): ``pytest -m gpu -q -n 15 tests/test_gluon_bwd.py -k any_sq``.
"""

from __future__ import annotations


import pytest
import torch

from hf_attn_plugin import reference
from hf_attn_plugin.kernels import configs, gluon_bwd
from hf_attn_plugin.kernels.params import AttentionParams
from tests.helpers import assert_fa2_rule, needs_hopper, pick_gluon_without_gluon, spy_launches
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


def _nan_pad(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[B, H, S]`` in the padded stats layout) with NaN in its pad columns: nothing may read them."""
    if t.stride(1) > t.shape[2]:
        t.as_strided((t.shape[0], t.shape[1], t.stride(1)), t.stride())[..., t.shape[2]:] = float("nan")
    return t


def _direct(*, B=1, Sq=256, Sk=None, Hq=4, Hkv=4, D=64, causal=True, dtype=torch.bfloat16, warp_spec=0,
            stats="contiguous"):
    """The kernel alone: forward by flash_attn_forward (whatever it picks), delta in PyTorch, dk/dv NaN-filled
    before the launch (every element must be written), checked against the reference backward. ``stats``: how lse
    and delta are handed over: "contiguous" (copied into the padded layout when Sq % 4), "padded" (flash.py's stats
    layout, as flash_attn_backward hands them, NaN in the pad: read in place, the pad never), "misaligned" (views 4
    bytes into a buffer: copied)."""
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
    if stats == "misaligned":
        lse, delta = (torch.cat([t.new_zeros(1), t.reshape(-1)])[1:].view(t.shape) for t in (lse, delta))
        assert lse.data_ptr() % 16 and delta.data_ptr() % 16
    elif stats == "padded":
        lse, delta = (_nan_pad(flash.stats_buffer(B, Hq, Sq, t.device)).copy_(t) for t in (lse, delta))
        assert flash.padded_stats(lse) is lse and flash.padded_stats(delta) is delta
    else:
        assert stats == "contiguous", stats
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    gluon_bwd.gluon_attn_backward_dkdv(dout, q, k, v, lse, delta, dk, dv, params, warp_spec=warp_spec)
    torch.cuda.synchronize()
    _, ref_dk, ref_dv, _ = reference.attention_reference_backward(dout.double(), q.double(), k.double(), v.double(),
                                                                  params)
    _, low_dk, low_dv, _ = reference.attention_reference_backward(dout, q, k, v, params, compute_dtype=dtype)
    label = f"B{B} Sq{Sq} Sk{Sk} {Hq}/{Hkv} D{D} causal={causal} {dtype} warp_spec={warp_spec} stats={stats}"
    for name, got, ref, low in (("dk", dk, ref_dk, low_dk), ("dv", dv, ref_dv, low_dv)):
        try:
            assert not got.isnan().any(), f"{name}: NaN (unwritten, or a NaN read)"
            assert_fa2_rule(got, ref, low, name)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}; {_where(got, ref)}") from None


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("warp_spec", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("S", [4, 100, 128, 1000, 2048])
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


# Sq % 4 in {1, 2, 3} (on the H200 these were illegal instructions before lse/delta got a padded row stride): Sq
# below / above Sk, one query tile and several, ragged last tiles, every GQA shape
ANY_SQ_CASES = {  # (Sq, Sk, causal, Hq, Hkv)
    "sq1_sk300_causal_gqa4": (1, 300, True, 8, 2),
    "sq2_sk130_bidir_mha": (2, 130, False, 4, 4),
    "sq3_sk3_causal_mqa": (3, 3, True, 8, 1),
    "sq257_sk700_causal_gqa4": (257, 700, True, 8, 2),
    "sq330_sk100_causal_gqa2": (330, 100, True, 6, 3),  # Sq > Sk: the first rows see no key
    "sq703_sk257_bidir_gqa4": (703, 257, False, 4, 1),
}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("warp_spec", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("case", list(ANY_SQ_CASES))
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_any_sq(D, case, warp_spec):
    Sq, Sk, causal, Hq, Hkv = ANY_SQ_CASES[case]
    for stats in ("contiguous", "padded"):
        _direct(B=2, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv, D=D, causal=causal, warp_spec=warp_spec, stats=stats)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("Sq", [300, 301])
def test_kernel_misaligned_lse_and_delta_any_sq(Sq):
    """lse/delta go through TMA descriptors, which need a 16-byte aligned base: the launcher copies them."""
    _direct(B=1, Sq=Sq, Hq=4, Hkv=2, D=64, causal=True, stats="misaligned")


def _poison_stats_pad(monkeypatch, flash):
    """flash.stats_buffer (the backward's lse and delta) with NaN in the pad: a kernel that reads it, or reads the
    stats with the wrong row stride, gives NaN or wrong gradients."""
    real = flash.stats_buffer
    monkeypatch.setattr(flash, "stats_buffer", lambda *args: _nan_pad(real(*args)))


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
    # Sq % 4 != 0 (lse copied into the padded stats layout, delta allocated in it)
    "any_sq_1": dict(B=2, Sq=1, Sk=300, Hq=4, Hkv=2),
    "any_sq_257_gqa4": dict(Sq=257, Sk=700, Hq=8, Hkv=2),
    "any_sq_334_fp16_bidir_transposed": dict(Sq=334, Hq=4, Hkv=4, causal=False, dtype=torch.float16,
                                             q_transposed=True),
    "any_sq_703_q_longer": dict(Sq=703, Sk=300, Hq=6, Hkv=2),
}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("variant", [0, 1, 2], ids=WS_IDS)
@pytest.mark.parametrize("case", list(BACKWARD_CASES))
@pytest.mark.parametrize("D", [64, 128])
def test_every_gluon_candidate_through_the_backward(flash_gpu, monkeypatch, gluon_bwd_ran, D, case, variant):
    """Each Gluon dK/dV candidate, forced as the dK/dV config, runs in flash_attn_backward (NaN-poisoned outputs,
    NaN in the pad of lse/delta) beside the Triton dQ: out, lse, dq, dk, dv within the FA2 rule of the oracles."""
    kw = dict(dict(dtype=torch.bfloat16, D=D), **BACKWARD_CASES[case])
    cfg = next(c for c in _gluon_bwd_candidates(D) if c.gluon == variant)
    _force_dkdv(monkeypatch, cfg)
    _poison_stats_pad(monkeypatch, flash_gpu)
    try:
        run_case(flash_gpu, device="cuda", **kw)
    except AssertionError as exc:
        pytest.fail(f"{cfg} {kw}: {exc}")
    assert gluon_bwd_ran == [cfg.gluon], f"{cfg}: the Gluon dK/dV kernel did not run ({gluon_bwd_ran})"


FALLBACK_CASES = GLUON_FALLBACK_CASES  # the Gluon forward's refusals (window, softcap + sinks, segments, dropout, ...)


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
    asked = pick_gluon_without_gluon(monkeypatch, "bwd_dkdv", configs.Config(64, 128, 8, 3, gluon=0))
    run_case(flash_cpu, Sq=70, Hq=4, Hkv=2, D=64)
    assert ("bwd_dkdv", False) in asked and ("bwd_dkdv", True) in asked
    assert asked.index(("bwd_dkdv", True)) == asked.index(("bwd_dkdv", False)) + 1


def test_unsupported_reason_names_the_features(monkeypatch):
    """On a (pretend) Hopper with Gluon: plain calls are accepted, each optional feature is refused by name."""
    from hf_attn_plugin.kernels import gluon_fwd

    if gluon_fwd.IMPORT_ERROR is not None:
        pytest.skip(f"this Triton has no Gluon: {gluon_fwd.IMPORT_ERROR!r}")
    monkeypatch.setattr(gluon_fwd, "is_hopper", lambda device: (True, (9, 0)))

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
    for sq in (1, 2, 3, 4, 5, 257, 333, 336):  # any Sq: lse/delta come with a padded row stride
        assert gluon_bwd.unsupported_reason(q_long[:, :sq], k, k) is None, sq


# ---------------------------------------------------------------------- the padded lse/delta layout (CPU)
def test_stats_layout():
    """flash.stats_buffer: [B, H, S] views with rows round_up(S, 4) floats apart, 16-byte aligned; padded_stats keeps
    a tensor in that layout and copies any other (the forward's contiguous lse: only when S % 4 != 0)."""
    from hf_attn_plugin.kernels import flash

    for seqlen in range(1, 10):
        padded = -(-seqlen // 4) * 4
        t = flash.stats_buffer(2, 3, seqlen, "cpu")
        assert t.shape == (2, 3, seqlen) and t.dtype == torch.float32, (seqlen, t.shape, t.dtype)
        assert t.stride() == (3 * padded, padded, 1) and t.data_ptr() % 16 == 0, (seqlen, t.stride())
        assert flash.padded_stats(t) is t
        src = torch.randn(2, 3, seqlen)
        got = flash.padded_stats(src)
        assert torch.equal(got, src) and got.stride() == t.stride() and (got is src) == (seqlen % 4 == 0), seqlen
        misaligned = torch.zeros(2 * 3 * padded + 1)[1:].as_strided((2, 3, seqlen), t.stride()).copy_(src)
        for other in (src.transpose(0, 1).contiguous().transpose(0, 1), misaligned):  # another layout; 4 bytes off
            got = flash.padded_stats(other)
            assert got is not other and torch.equal(got, src) and got.stride() == t.stride() and not got.data_ptr() % 16


def test_stat_descriptor_reads_the_padded_layout():
    """The Gluon kernel's lse/delta descriptors: 2-D [B * Hq, Sq] over the padded layout (row stride round_up(Sq, 4),
    which TMA needs 16-byte aligned), read in place when the tensor has the layout, else from a padded copy."""
    from hf_attn_plugin.kernels import flash

    if gluon_bwd.IMPORT_ERROR is not None:
        pytest.skip(f"this Triton has no Gluon: {gluon_bwd.IMPORT_ERROR!r}")
    for seqlen in (1, 2, 3, 4, 257):
        padded = -(-seqlen // 4) * 4
        src = torch.randn(2, 3, seqlen)
        buf = flash.stats_buffer(2, 3, seqlen, "cpu").copy_(src)
        for t, in_place in ((buf, True), (src, seqlen % 4 == 0)):
            desc = gluon_bwd._stat_descriptor(t, 64)
            assert (desc.base is t) == in_place and torch.equal(desc.base, src), seqlen
            assert (list(desc.shape), list(desc.strides), list(desc.block_shape)) == ([6, seqlen], [padded, 1], [1, 64])
            assert desc.base.stride(0) == 3 * padded  # row (b, h) of the descriptor = b * Hq + h


def _spy_stats_strides(monkeypatch, flash):
    """{kernel name: [strides of the lse / delta tensors of each launch]} for the backward's Triton kernels."""
    seen = {}
    for name, slots in (("_bwd_preprocess", (2,)), ("_attn_bwd_dq", (4, 5)), ("_attn_bwd_dkdv", (4, 5))):
        spy_launches(monkeypatch, flash, name, lambda args, kwargs, name=name, slots=slots: seen.setdefault(
            name, []).extend(tuple(args[i].stride()) for i in slots))
    return seen


ANY_SQ_CPU_CASES = {  # Sq % 4 in {1, 2, 3}; Sq below and above Sk; GQA; D 64 and 128; segments; sinks
    "sq5_causal_gqa2": dict(B=2, Sq=5, Sk=37, Hq=4, Hkv=2),
    "sq38_bidir_gqa3_q_longer": dict(B=2, Sq=38, Sk=20, Hq=3, Hkv=1, causal=False),
    "sq67_causal_q_longer": dict(Sq=67, Sk=30, Hq=2, Hkv=1),  # the first rows see no key
    "sq3_d128_fp16": dict(Sq=3, Sk=70, Hq=2, Hkv=1, D=128, dtype=torch.float16),
    "sq63_segments": dict(B=2, Sq=63, Sk=90, Hq=2, Hkv=1, segments=[[0, 3, 63, 0, 50], [1, 0, 41, 10, 90]]),
    "sq33_sinks_bidir": dict(Sq=33, Hq=4, Hkv=2, sinks=True, causal=False),
}


@pytest.mark.parametrize("dkdv_ws", [False, True], ids=["dkdv_phases", "dkdv_warp_spec"])
@pytest.mark.parametrize("case", list(ANY_SQ_CPU_CASES))
def test_backward_any_sq_padded_stats_through_the_triton_kernels(flash_cpu, monkeypatch, case, dkdv_ws):
    """Any Sq: the backward hands lse and delta to every Triton kernel in the padded layout (rows round_up(Sq, 4)
    apart; NaN in the pad here), and the kernels read them by their strides: forward + backward within the FA2 rule,
    finite. (A kernel reading the stats with a row stride of Sq, or the pad, fails this.) ``dkdv_ws``: the Triton
    dK/dV kernel's warp-specialized form (its own lse/delta addressing) instead of the three-phase one."""
    if dkdv_ws:
        monkeypatch.setitem(configs._INTERPRET, "bwd_dkdv", configs.Config(16, 32, 4, 1, warp_spec=True))
    kw = ANY_SQ_CPU_CASES[case]
    padded = -(-kw["Sq"] // 4) * 4
    _poison_stats_pad(monkeypatch, flash_cpu)
    seen = _spy_stats_strides(monkeypatch, flash_cpu)
    run_case(flash_cpu, **kw)
    layout = (kw["Hq"] * padded, padded, 1)
    assert set(seen) == {"_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv"}, seen
    assert all(strides == [layout] * len(strides) for strides in seen.values()), (layout, seen)


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
