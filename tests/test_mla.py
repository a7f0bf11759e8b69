"""A value head dim of its own (multi-head latent attention: DeepSeek-V2/V3, q/k head dim 192, v head dim 128).

CPU: the reference against plain PyTorch; the Triton kernels under the interpreter (fp32, fp16; small shapes), forward
and backward against the reference with FA2's error rule (``run_case`` with ``Dv``) at (D, Dv) pairs above, below and
between powers of two, with every feature (dropout exact given the kernels' mask), the warp-specialized and two-pass
dK/dV, the Gluon kernels declining; the op's shape checks and fake kernels; a tiny DeepSeek-V3 under "plugin" against
"eager" (reference and Triton backends). GPU (``-m gpu``): bf16 at real MLA pairs, every feature and every tuning
candidate, fp16/fp32, the model.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import DataCollatorWithFlattening  # noqa: E402

from hf_attn_plugin import decode_ops, ops, reference  # noqa: E402
from hf_attn_plugin.kernels.host import next_power_of_2  # noqa: E402
from hf_attn_plugin.ops import AttentionParams  # noqa: E402

from .helpers import KERNEL_KINDS, each_candidate, pick_gluon_without_gluon, spy_launches  # noqa: E402
from .models import deepseek_v3, make_pair  # noqa: E402
from .test_flash_kernels import CACHE, LEFT_PAD, PACKED, run_case  # noqa: E402

PAIRS = [(192, 128), (64, 32), (32, 64), (72, 40)]  # (D, Dv): DeepSeek's, Dv < D, Dv > D, neither a power of two
PAIR_IDS = [f"d{d}_dv{dv}" for d, dv in PAIRS]


# ---------------------------------------------------------------------------------------------- the reference


def test_reference_computes_a_value_head_dim_of_its_own():
    """The oracle itself at D 24 / Dv 40: plain softmax(q k^T) v (GQA by repeating K/V, causal bottom-right with q
    shorter than k), and its written-out backward against autograd of that."""
    B, Sq, Sk, Hq, Hkv, D, Dv = 2, 5, 9, 4, 2, 24, 40
    q, k, v = (torch.randn(B, s, h, d, dtype=torch.float64, requires_grad=True)
               for s, h, d in ((Sq, Hq, D), (Sk, Hkv, D), (Sk, Hkv, Dv)))
    out, lse = reference.attention_reference(q, k, v, scale=0.3, causal=True)
    kr, vr = (t.repeat_interleave(Hq // Hkv, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * 0.3
    visible = torch.arange(Sk).view(1, -1) <= torch.arange(Sq).view(-1, 1) + (Sk - Sq)
    s = s.masked_fill(~visible, float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vr)
    assert out.shape == (B, Sq, Hq, Dv)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1))
    dout = torch.randn_like(out)
    grads = reference.attention_reference_backward(dout, q, k, v, scale=0.3, causal=True)[:3]
    for got, exp, x in zip(grads, torch.autograd.grad(want, (q, k, v), dout), (q, k, v)):
        assert got.shape == x.shape
        torch.testing.assert_close(got, exp)


# ---------------------------------------------------------------------------------------------- kernels (interpreter)


@pytest.mark.parametrize("D,Dv", PAIRS, ids=PAIR_IDS)
def test_pairs_causal_gqa(flash_cpu, D, Dv):
    run_case(flash_cpu, D=D, Dv=Dv, Sq=70, Hq=4, Hkv=2)


@pytest.mark.parametrize("D,Dv", PAIRS, ids=PAIR_IDS)
def test_pairs_fp16_bidirectional_mqa(flash_cpu, D, Dv):
    run_case(flash_cpu, D=D, Dv=Dv, Sq=50, Sk=61, Hq=4, Hkv=1, causal=False, dtype=torch.float16)


# Each feature at one of the pairs (the pairs take turns). Sizes as tests/test_flash_kernels.py's.
FEATURE_CASES = {
    "window": dict(D=64, Dv=32, window=17, Sq=100, Hq=4, Hkv=2),
    "window_rows_outside": dict(D=32, Dv=64, window=24, Sq=120, Sk=80, Hq=4, Hkv=2),
    "window_bidirectional": dict(D=72, Dv=40, window=20, causal=False, Sq=90, Hq=2, Hkv=1),
    "softcap": dict(D=72, Dv=40, softcap=2.0, scale=0.5, Sq=80, Hq=4, Hkv=2),
    "sinks": dict(D=32, Dv=64, sinks=True, Sq=80, Sk=100, Hq=4, Hkv=2),
    "q_shorter_than_k": dict(D=64, Dv=32, Sq=37, Sk=150, Hq=2, Hkv=1),
    "q_longer_than_k": dict(D=32, Dv=64, Sq=150, Sk=37, Hq=2, Hkv=1),  # top rows see no key: out 0, lse 0
    "packed": dict(D=72, Dv=40, segments=PACKED, Sq=100, Hq=2, Hkv=1),
    "left_pad": dict(D=192, Dv=128, segments=LEFT_PAD, B=3, Sq=64, Hq=2, Hkv=1),
    "cache_bidirectional": dict(D=64, Dv=32, segments=CACHE, B=2, Sq=64, Sk=90, Hq=2, Hkv=1, causal=False),
    "dropout": dict(D=64, Dv=32, dropout_p=0.3, Sq=50, Sk=70, Hq=4, Hkv=2),
    "dropout_everything_fp16": dict(D=32, Dv=64, dtype=torch.float16, dropout_p=0.2, sinks=True, softcap=5.0,
                                    window=21, segments=CACHE, B=2, Sq=64, Sk=90, Hq=4, Hkv=2, q_transposed=True),
    "everything_fp16": dict(D=72, Dv=40, dtype=torch.float16, sinks=True, softcap=5.0, window=21, segments=PACKED,
                            Sq=100, Hq=4, Hkv=2, q_transposed=True, kv_transposed=True),
    "everything_d192": dict(D=192, Dv=128, sinks=True, softcap=5.0, window=21, segments=CACHE, B=2, Sq=64, Sk=90,
                            Hq=4, Hkv=2, q_transposed=True),
}


@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_features(flash_cpu, case):
    run_case(flash_cpu, **FEATURE_CASES[case])


def _interpret_configs(monkeypatch, **kinds):
    from hf_attn_plugin.kernels import configs

    for kind, cfg in kinds.items():
        monkeypatch.setitem(configs._INTERPRET, kind, cfg)


@pytest.mark.parametrize("case", ["everything_fp16", "q_longer_than_k"])
def test_warp_specialized(flash_cpu, monkeypatch, case):
    """The warp-specialized forward and dK/dV: V and dO through their own (``Dv`` wide) TMA descriptors."""
    from hf_attn_plugin.kernels.configs import Config

    _interpret_configs(monkeypatch, fwd=Config(32, 16, 4, 1, warp_spec=True),
                       bwd_dkdv=Config(16, 32, 4, 1, warp_spec=True))
    run_case(flash_cpu, **FEATURE_CASES[case])


@pytest.mark.parametrize("case", ["dropout", "left_pad"])
def test_two_pass_dkdv(flash_cpu, monkeypatch, case):
    """``Config.two_pass`` (dV, then dK: one accumulator each, ``[BLOCK_N, Dv]`` then ``[BLOCK_N, D]``)."""
    from hf_attn_plugin.kernels import flash
    from hf_attn_plugin.kernels.configs import Config

    _interpret_configs(monkeypatch, bwd_dkdv=Config(16, 32, 4, 1, two_pass=True))
    passes = []
    spy_launches(monkeypatch, flash, "_attn_bwd_dkdv",
                 lambda args, kwargs: passes.append((kwargs["WANT_DK"], kwargs["WANT_DV"], kwargs["BLOCK_DV"])))
    run_case(flash_cpu, **FEATURE_CASES[case])
    block_dv = max(next_power_of_2(FEATURE_CASES[case]["Dv"]), 16)
    assert passes == [(False, True, block_dv), (True, False, block_dv)]


def test_gluon_kernels_decline_a_value_head_dim_of_their_own(flash_cpu):
    """The Gluon forward and dK/dV have one head dim: a reason (so the Triton kernels run), whatever the device."""
    q, k = torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64)
    params = AttentionParams.create(64)
    for backward in (False, True):
        reason = flash_cpu._gluon_unsupported(q, k, torch.randn(1, 8, 2, 32), params, backward)
        assert "one head dim" in reason and "value 32" in reason
        assert "one head dim" not in flash_cpu._gluon_unsupported(q, k, k, params, backward)


@pytest.mark.parametrize("kind", ["fwd", "bwd_dkdv"])
def test_gluon_config_runs_triton_for_a_value_head_dim(flash_cpu, monkeypatch, kind):
    """A Gluon config picked for a call with Dv != D: the key's Triton config runs it (Gluon never imported)."""
    from hf_attn_plugin.kernels.configs import Config

    asked = pick_gluon_without_gluon(monkeypatch, kind, Config(64, 128, 8, 2, gluon=0))
    run_case(flash_cpu, D=64, Dv=32, Sq=40, Hq=2, Hkv=1)
    assert (kind, True) in asked


@pytest.mark.parametrize("D,Dv,bucket", [(32, 64, 64), (64, 32, 64), (192, 128, 256), (72, 160, 256)])
def test_launch_configs_are_picked_by_the_wider_head_dim(flash_cpu, monkeypatch, D, Dv, bucket):
    """Every kernel's config comes from the bucket of max(D, Dv) (kernels/flash.py ``_Launch.config_d``)."""
    from hf_attn_plugin.kernels import configs

    asked = []
    real = configs.pick

    def pick(kind, block_d, key, launch=None, **kwargs):
        asked.append((kind, configs._dim_bucket(block_d)))
        return real(kind, block_d, key, launch, **kwargs)

    monkeypatch.setattr(configs, "pick", pick)
    q, k, v = torch.randn(1, 20, 2, D), torch.randn(1, 20, 1, D), torch.randn(1, 20, 1, Dv)
    params = AttentionParams.create(D)
    out, lse = flash_cpu.flash_attn_forward(q, k, v, params)
    flash_cpu.flash_attn_backward(torch.randn_like(out), q, k, v, out, lse, params)
    assert sorted(asked) == [("bwd_dkdv", bucket), ("bwd_dq", bucket), ("fwd", bucket)]


def test_unsupported_value_head_dim_is_refused(flash_cpu):
    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(ValueError, match="value head_dim 44 is not supported .* every multiple of 8 from 16 to 256"):
        flash_cpu.flash_attn_forward(q, q, torch.randn(1, 8, 2, 44), AttentionParams(0.1))


# ---------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("shape_v", [(3, 9, 2, 16), (2, 8, 2, 16), (2, 9, 1, 16)], ids=["batch", "seqlen", "heads"])
def test_op_refuses_k_v_mismatches_other_than_the_head_dim(shape_v):
    q, k = torch.randn(2, 7, 4, 24), torch.randn(2, 9, 2, 24)
    shown = ", ".join(map(str, shape_v))
    with pytest.raises(ValueError, match=rf"same batch, sequence length and heads .* v \({shown}\)"):
        ops.attention(q, k, torch.randn(*shape_v))
    assert ops.attention(q, k, torch.randn(2, 9, 2, 16)).shape == (2, 7, 4, 16)  # only the head dim may differ


@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_value_head_dim(reference_backend, dropout):
    """Both custom ops at D 24 / Dv 16: fake kernels (output ``[B, Sq, Hq, Dv]``), autograd, aot dispatch."""
    q = torch.randn(2, 7, 4, 24, requires_grad=True)
    k = torch.randn(2, 9, 2, 24, requires_grad=True)
    v = torch.randn(2, 9, 2, 16, requires_grad=True)
    seg = torch.tensor([[0, 0, 7, 0, 9], [1, 2, 7, 1, 8]], dtype=torch.int32)
    args = (q, k, v, seg, torch.randn(4, requires_grad=True), 0.25, True, 5, 3.0, 7, 9)
    if dropout:
        args += (0.2, ops.dropout_seed("cpu"))
    torch.library.opcheck(ops._attention_fwd, args)
    out, lse = ops._attention_fwd(*args)
    assert out.shape == (2, 7, 4, 16)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach()) + tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:])
    torch.library.opcheck(ops._attention_bwd, bwd_args)


def test_op_triton_backend_autograd(flash_cpu, monkeypatch):
    """``ops.attention`` on the Triton backend (interpreter) with autograd, returned LSE, GQA, window and sinks at
    D 32 / Dv 48, against the float64 reference."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q = torch.randn(1, 4, 40, 32).transpose(1, 2).requires_grad_()
    k = torch.randn(1, 45, 2, 32, requires_grad=True)
    v = torch.randn(1, 45, 2, 48, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    out, lse = ops.attention(q, k, v, causal=True, window=16, sinks=sinks, return_lse=True)
    out.sum().backward()  # stride-0 incoming grad
    xs = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, ref_lse = reference.attention_reference(*xs[:3], causal=True, window=16, sinks=xs[3])
    ref.sum().backward()
    assert out.shape == (1, 40, 4, 48)
    for g, r in zip([out.detach(), lse, q.grad, k.grad, v.grad, sinks.grad], [ref, ref_lse] + [x.grad for x in xs]):
        torch.testing.assert_close(g.double(), r.double(), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- DeepSeek-V3


ATOL = 2e-5  # tests/test_models.py's


def _padded_batch(vocab, device="cpu", lengths=(12, 9, 5)):
    """Right-padded ``(ids, mask)``."""
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)).view(1, -1) < torch.tensor(lengths).view(-1, 1)).long()
    return ids.to(device), mask.to(device)


def _logits_and_grads_match(ours, eager, atol, grad_atol, grad_rtol, device="cpu"):
    """Training mode, a right-padded batch: logits of the valid tokens, the loss and every parameter's gradient."""
    ours.train()
    eager.train()
    ids, mask = _padded_batch(ours.config.vocab_size, device)
    labels = ids.masked_fill(mask == 0, -100)
    got = ours(ids, attention_mask=mask, labels=labels)
    want = eager(ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=atol, rtol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, atol=atol, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    eager_params = dict(eager.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, eager_params[name].grad, atol=grad_atol, rtol=grad_rtol,
                                       msg=lambda m: f"{name}: {m}")
            checked += "self_attn" in name
    assert checked >= 10  # every layer's attention projections got a gradient


def _greedy_tokens_match(ours, eager, cache, device="cpu"):
    """Left-padded greedy generation: token-identical."""
    ours.eval()
    eager.eval()
    lengths = (7, 3, 5)
    ids = torch.randint(1, ours.config.vocab_size, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)).view(1, -1) >= max(lengths) - torch.tensor(lengths).view(-1, 1)).long()
    kwargs = dict(attention_mask=mask.to(device), max_new_tokens=10, do_sample=False, cache_implementation=cache,
                  pad_token_id=0)
    got, want = ours.generate(ids.to(device), **kwargs), eager.generate(ids.to(device), **kwargs)
    assert got.shape == want.shape and torch.equal(got, want)


def _spy_flash_op(monkeypatch, module=ops, name="attention_trusted") -> list:
    """Record ``(q.shape, v.shape)`` of every call the integration makes to the flash op (or to ``module.name``)."""
    seen = []
    real = getattr(module, name)

    def spy(q, k, v, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(v.shape)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_deepseek_v3_matches_eager(reference_backend, monkeypatch):
    ours, eager = make_pair(deepseek_v3())
    seen = _spy_flash_op(monkeypatch)
    _logits_and_grads_match(ours, eager, ATOL, 1e-5, 1e-3)
    # what the model hands over (transformers 5.24: value states unpadded for "plugin"): q/k 24 wide, v 16
    assert seen and all(q[-1] == 24 and v[-1] == 16 for q, v in seen), seen
    for cache in ("dynamic", "static"):
        _greedy_tokens_match(ours, eager, cache)


def test_deepseek_v3_triton_kernels_match_eager(triton_backend, flash_cpu, monkeypatch):
    """Through the Triton kernels (interpreter, fp32): padded batch and gradients, packed sequences, and greedy
    decoding, whose single-token steps the decode route serves (the paged kernel reads V with its own head dim)."""
    ours, eager = make_pair(deepseek_v3())
    _logits_and_grads_match(ours, eager, 1e-4, 1e-4, 1e-3)  # tests/test_models.py's Triton tolerances
    features = [{"input_ids": torch.randint(1, 128, (n,)).tolist()} for n in (5, 8, 3)]
    batch = DataCollatorWithFlattening()(features, return_tensors="pt")
    batch.pop("labels")
    with torch.no_grad():
        packed = ours.eval()(**batch, use_cache=False).logits[0]
        separate = torch.cat([eager.eval()(torch.tensor([f["input_ids"]])).logits[0] for f in features])
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)
    seen = _spy_flash_op(monkeypatch, decode_ops, "attention")
    _greedy_tokens_match(ours, eager, "dynamic")
    assert any(q[1] == 1 and v[-1] == 16 for q, v in seen), seen  # decode steps ran the decode route


# ---------------------------------------------------------------------------------------------- GPU


GPU_PAIRS = [(192, 128), (128, 64), (96, 64), (256, 128)]
GPU_PAIR_IDS = [f"d{d}_dv{dv}" for d, dv in GPU_PAIRS]
GPU_CASES = {
    "causal_gqa": dict(Sq=1000, Hq=8, Hkv=2),
    "bidir_ragged": dict(B=2, Sq=333, Sk=700, Hq=4, Hkv=4, causal=False, q_transposed=True, kv_transposed=True),
    "chunked_prefill": dict(Sq=300, Sk=1500, Hq=8, Hkv=1),
    "everything": dict(B=2, Sq=700, Sk=1500, Hq=8, Hkv=2, sinks=True, softcap=20.0, window=200, q_transposed=True,
                       segments=[[0, 0, 700, 0, 1500], [1, 50, 650, 100, 1000], [1, 650, 650, 1000, 1000]]),
    "dropout_window": dict(Sq=600, Sk=650, Hq=4, Hkv=2, window=150, dropout_p=0.1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("D,Dv", GPU_PAIRS, ids=GPU_PAIR_IDS)
def test_gpu_bf16(flash_gpu, D, Dv, case):
    run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, Dv=Dv, **GPU_CASES[case])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("D,Dv", [(192, 128), (96, 64)], ids=["d192_dv128", "d96_dv64"])
def test_gpu_other_dtypes(flash_gpu, D, Dv, dtype):
    run_case(flash_gpu, device="cuda", dtype=dtype, D=D, Dv=Dv, Sq=800, Hq=4, Hkv=2, window=300, sinks=True)


@pytest.mark.gpu
@pytest.mark.parametrize("D,Dv", GPU_PAIRS, ids=GPU_PAIR_IDS)
def test_gpu_every_tuning_candidate(flash_gpu, monkeypatch, D, Dv):
    """Each candidate of the pair's bucket (the larger head dim's), two-pass and warp-specialized dK/dV included."""
    for i, forced in each_candidate(monkeypatch, (max(D, Dv),)):
        try:
            run_case(flash_gpu, device="cuda", dtype=torch.bfloat16, D=D, Dv=Dv, Sq=500, Sk=600, Hq=4, Hkv=2,
                     window=200)
        except AssertionError as exc:
            used = {kind: forced(kind, max(D, Dv))[0] for kind in KERNEL_KINDS}
            pytest.fail(f"candidate #{i} at D={D}, Dv={Dv} {used}: {exc}")


@pytest.mark.gpu
def test_gpu_deepseek_v3_matches_eager(monkeypatch):
    """The tiny DeepSeek-V3 on the GPU (fp32, compiled kernels) against eager: logits, loss, every gradient, greedy
    decoding."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    ours, eager = (m.cuda() for m in make_pair(deepseek_v3()))
    _logits_and_grads_match(ours, eager, 1e-4, 1e-4, 1e-3, device="cuda")
    _greedy_tokens_match(ours, eager, "dynamic", device="cuda")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph(flash_gpu, monkeypatch):
    """The op at D 192 / Dv 128 under torch.compile (fake kernel: a [B, Sq, Hq, Dv] output), forward and backward
    give the eager calls' results (same kernels, deterministic)."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    q = torch.randn(2, 8, 500, 192, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 500, 8, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 500, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(q, k, v):
        return (ops.attention(q, k, v, causal=True, window=256).float() ** 2).sum()

    loss = torch.compile(step, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = step(q, k, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
