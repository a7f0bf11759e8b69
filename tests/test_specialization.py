"""No kernel recompiles because a length grew (issue 15: "no tuning stalls").

Triton compiles a kernel once per value class of each integer argument (== 1, divisible by 16, other) unless the
kernel says otherwise. Arguments that follow a call's lengths would pick a new class as a generation grows, and each
new class is a compilation in the middle of the run: on the H200 the decode kernel stalled ~0.8 s at the 16th new
token of a 512-token prompt (its block-table row stride is the key count), the flash kernels at every new prompt
length class. These tests compute Triton's own specialization key of each launch (the binder Triton runs before
choosing a compiled variant, for sm_90, on the host: no GPU needed) and require one key across length classes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first @triton.jit: the interpreter is chosen there
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_attn_plugin import decode_ops, ops  # noqa: E402
from hf_attn_plugin.kernels import flash, host, paged  # noqa: E402

from .helpers import DEVICE, needs_kernels, spy_launches  # noqa: E402

jit = pytest.importorskip("triton.runtime.jit")


def _binder(kernel):
    """Triton's argument binder of ``kernel`` (a JITFunction, or the interpreter's wrapper of one) for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if not isinstance(kernel, jit.JITFunction):  # the interpreter's InterpretedFunction keeps fn and the jit kwargs
        kernel = jit.JITFunction(kernel.fn, **kernel.kwargs)
    return jit.create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))


class _Specializations:
    """The specialization key of each launch of a kernel (``keys``), recorded by :func:`_spy`."""

    def __init__(self, kernel):
        self.binder, self.keys = _binder(kernel), []

    def record(self, args, kwargs):
        _, specialization, _ = self.binder(*args, **kwargs)
        self.keys.append(repr(specialization))


def _spy(monkeypatch, module, name) -> _Specializations:
    spy = _Specializations(getattr(module, name))
    spy_launches(monkeypatch, module, name, spy.record)
    return spy


@needs_kernels
def test_decode_kernel_is_one_variant_for_every_key_count_and_split_count(monkeypatch, triton_backend):
    """Plain generate()'s decode step (a contiguous cache read as a virtual pool) at key counts of each class, with
    and without split-K, and split counts of each class: one specialization per split mode."""
    spy = _spy(monkeypatch, paged, "_paged_attention_kernel")
    keys = {}
    for num_splits in (1, 3, 16):
        for seqlen_k in (40, 48, 57):  # other, multiple of 16, other
            q = torch.randn(1, 1, 4, 16, device=DEVICE)
            k, v = (torch.randn(1, 2, seqlen_k, 16, device=DEVICE).transpose(1, 2) for _ in range(2))
            decode_ops.attention(q, k, v, scale=0.25, causal=True, num_splits=num_splits)
            keys.setdefault(num_splits > 1, set()).add(spy.keys[-1])
    assert len(spy.keys) == 9
    assert {mode: len(k) for mode, k in keys.items()} == {False: 1, True: 1}, keys


@needs_kernels
def test_flash_kernels_are_one_variant_for_every_length(monkeypatch, triton_backend):
    """Prefill lengths of each class through the forward and the backward: one key per kernel."""
    spies = {name: _spy(monkeypatch, flash, name)
             for name in ("_attn_fwd", "_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv")}
    for seqlen in (40, 48, 57):
        q, k, v = (torch.randn(1, seqlen, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
        ops.attention(q, k, v, causal=True).sum().backward()
    for name, spy in spies.items():
        assert len(spy.keys) == 3, name
        assert len(set(spy.keys)) == 1, f"{name} specialises on a length: {spy.keys}"


@pytest.mark.gpu
def test_gluon_kernels_are_one_variant_for_every_length(monkeypatch):
    """The Hopper forward and dK/dV kernels, called directly at lengths of each class (bf16)."""
    from hf_attn_plugin.kernels import gluon_bwd, gluon_fwd
    from hf_attn_plugin.kernels.params import AttentionParams

    params = AttentionParams.create(64, causal=True)
    probe = torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    reason = gluon_fwd.unsupported_reason(probe, probe, probe, params)
    if reason is not None:
        pytest.skip(reason)
    fwd = _spy(monkeypatch, gluon_fwd, "_attn_fwd_gluon")
    bwd = _spy(monkeypatch, gluon_bwd, "_attn_bwd_dkdv_gluon")
    for seqlen in (136, 144, 153):
        q, k, v, dout = (torch.randn(1, seqlen, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = gluon_fwd.gluon_attn_forward(q, k, v, params)
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        gluon_bwd.gluon_attn_backward_dkdv(dout, q, k, v, lse.contiguous(), delta, torch.empty_like(k),
                                           torch.empty_like(v), params)
    torch.cuda.synchronize()
    for spy in (fwd, bwd):
        assert len(spy.keys) == 3 and len(set(spy.keys)) == 1, spy.keys


# --------------------------------------------------------------------------- relaunches of a compiled kernel
class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*args, stream=...)`` records the launch."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        grid[2]  # as Triton's runner, which reads three extents (IndexError for a 1-D or 2-D grid)
        return lambda *args, stream=None: self.calls.append((grid, stream, args))


_FakeCompiled.__name__ = "CompiledKernel"


class _FakeKernel:
    """Stands in for a JITFunction: ``kernel[grid](...)`` compiles (counted) and returns a fresh fake kernel."""

    arg_names = ["x_ptr", "n", "scale", "BLOCK"]

    def __init__(self):
        self.jit_launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_launches.append((grid, args, kwargs))
            return _FakeCompiled()

        return launch


def test_relauncher_reuses_a_compiled_kernel_only_for_the_same_specialization(monkeypatch):
    """The first launch of each (dtype, 16-byte alignment, integer value) combination goes through the JIT; a repeat
    launches the kernel it returned, with every argument (constexprs last) on the current device's stream."""
    monkeypatch.setattr(host, "_RELAUNCH", True)
    monkeypatch.setattr(host, "_current_stream", lambda index: 1000 + index)
    device = [0]
    monkeypatch.setattr(host, "_current_device", lambda: device[0])
    kernel = _FakeKernel()
    relauncher = host.Relauncher(kernel, dict(BLOCK=64), num_warps=4, num_stages=2)
    buffer = torch.zeros(64)
    x, shifted = buffer[:16], buffer[1:17]  # 4 bytes apart: not 16-byte aligned
    assert shifted.data_ptr() % 16 != 0

    relauncher.launch((2, 1, 1), (x, 32, 0.5))
    assert len(kernel.jit_launches) == 1
    grid, args, kwargs = kernel.jit_launches[0]
    assert grid == (2, 1, 1) and args == (x, 32, 0.5) and kwargs == dict(BLOCK=64, num_warps=4, num_stages=2)
    (compiled,) = relauncher.compiled.values()

    relauncher.launch((3, 1, 1), (buffer[16:32], 32, 0.5))  # another aligned tensor, another grid: relaunch
    assert len(kernel.jit_launches) == 1
    ((grid, stream, args),) = compiled.calls
    assert grid == (3, 1, 1) and stream == 1000
    assert args[0].data_ptr() == buffer[16:32].data_ptr() and args[1:] == (32, 0.5, 64)

    for args in ((shifted, 32, 0.5), (x.double(), 32, 0.5), (x, 48, 0.5), (x, 1, 0.5), (x, 32, 0.25)):
        relauncher.launch((2, 1, 1), args)  # misaligned, another dtype, integer, float: the JIT each time
    assert len(kernel.jit_launches) == 6 and len(compiled.calls) == 1
    device[0] = 1  # the same arguments with another device current: that device's own kernel, then relaunched there
    for _ in range(2):
        relauncher.launch((2, 1, 1), (x, 32, 0.5))
    assert len(kernel.jit_launches) == 7 and len(compiled.calls) == 1
    assert relauncher.compiled[1, host.relaunch_key((x, 32, 0.5))].calls[0][1] == 1001


def test_relauncher_keeps_nothing_where_relaunching_is_unsupported(monkeypatch):
    """The interpreter (or an unknown Triton) returns no CompiledKernel: every launch goes through the JIT."""
    monkeypatch.setattr(host, "_RELAUNCH", False)
    kernel = _FakeKernel()
    relauncher = host.Relauncher(kernel, dict(BLOCK=64))
    for _ in range(3):
        relauncher.launch((1, 1, 1), (torch.zeros(4), 8, 1.0))
    assert len(kernel.jit_launches) == 3 and not relauncher.compiled


def test_relauncher_requires_the_constexprs_last():
    with pytest.raises(ValueError, match="last parameters"):
        host.Relauncher(_FakeKernel(), dict(n=3))


def test_relauncher_takes_constexprs_in_any_order_and_trailing_arguments_by_name(monkeypatch):
    """Constexprs go to the launcher in signature order whatever the dict's order; runtime arguments given by name
    are put in their signature slots, and a wrong set of names is refused."""
    monkeypatch.setattr(host, "_RELAUNCH", True)
    monkeypatch.setattr(host, "_current_stream", lambda index: 7)
    monkeypatch.setattr(host, "_current_device", lambda: 0)
    kernel = _FakeKernel()
    kernel.arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]
    relauncher = host.Relauncher(kernel, dict(FLAG=True, BLOCK=64))
    x = torch.zeros(16)
    relauncher.launch((1, 1, 1), (x,), scale=0.5, n=32)
    assert kernel.jit_launches[0][1] == (x, 32, 0.5)
    relauncher.launch((4, 2), (x, 32), scale=0.5)  # a 2-D grid, as the flash kernels launch with
    (compiled,) = relauncher.compiled.values()
    assert compiled.calls[0][0] == (4, 2, 1)
    assert compiled.calls[0][2][1:] == (32, 0.5, 64, True)  # runtime arguments, then BLOCK, FLAG
    with pytest.raises(TypeError, match="given by name"):
        relauncher.launch((1, 1, 1), (x,), scale=0.5, m=32)


def test_shared_relaunchers_are_one_per_kernel_constexprs_and_options(monkeypatch):
    monkeypatch.setattr(host, "_RELAUNCHERS", {})
    kernel, other = _FakeKernel(), _FakeKernel()
    first = host.relauncher(kernel, dict(BLOCK=64), num_warps=4)
    assert host.relauncher(kernel, dict(BLOCK=64), num_warps=4) is first
    assert len({id(first), id(host.relauncher(kernel, dict(BLOCK=32), num_warps=4)),
                id(host.relauncher(kernel, dict(BLOCK=64), num_warps=8)),
                id(host.relauncher(other, dict(BLOCK=64), num_warps=4))}) == 4


def test_relauncher_keeps_a_bounded_number_of_keys(monkeypatch):
    """Lengths and strides are part of the key (training with varying lengths meets a new key per shape): the table
    is emptied when full rather than growing without bound."""
    monkeypatch.setattr(host, "_RELAUNCH", True)
    monkeypatch.setattr(host, "_current_device", lambda: 0)
    monkeypatch.setattr(host.Relauncher, "MAX_KEYS", 3)
    relauncher = host.Relauncher(_FakeKernel(), dict(BLOCK=64))
    for n in range(7):
        relauncher.launch((1, 1, 1), (torch.zeros(4), n, 1.0))
        assert 1 <= len(relauncher.compiled) <= 3
    assert (0, host.relaunch_key((torch.zeros(4), 6, 1.0))) in relauncher.compiled


def _flash_launches(monkeypatch):
    """The Triton launches of one forward + backward with segments, sinks and dropout: {kernel: (args, kwargs)}."""
    launches = {}
    for name in ("_attn_fwd", "_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv"):
        spy_launches(monkeypatch, flash, name, lambda args, kwargs, name=name: launches.setdefault(name, (args, kwargs)))
    q, k, v = (torch.randn(2, 40, h, 16, device=DEVICE, requires_grad=True) for h in (4, 2, 2))
    segments = torch.tensor([[0, 0, 30, 0, 35], [1, 5, 40, 0, 40]], dtype=torch.int32, device=DEVICE)
    sinks = torch.zeros(4, device=DEVICE, requires_grad=True)
    ops.attention(q, k, v, causal=True, segments=segments, sinks=sinks, dropout_p=0.1).sum().backward()
    return {(flash, name): launch for name, launch in launches.items()}


def _decode_launches(monkeypatch):
    launches = []
    spy_launches(monkeypatch, paged, "_paged_attention_kernel", lambda args, kwargs: launches.append((args, kwargs)))
    q = torch.randn(2, 1, 4, 16, device=DEVICE)
    k, v = (torch.randn(2, 2, 40, 16, device=DEVICE).transpose(1, 2) for _ in range(2))
    decode_ops.attention(q, k, v, scale=0.25, causal=True, num_splits=3)
    return {(paged, "_paged_attention_kernel"): launches[0]}


@needs_kernels
@pytest.mark.parametrize("launches", [_decode_launches, _flash_launches], ids=["decode", "flash"])
def test_relauncher_key_is_finer_than_tritons_specialization(monkeypatch, triton_backend, launches):
    """Arguments with one relaunch key have one Triton specialization key (sm_90's binder), for each relaunched
    kernel's real arguments with their tensors moved off 16-byte alignment and their integers changed class one at a
    time."""
    for (module, name), (args, kwargs) in launches(monkeypatch).items():
        binder = _binder(getattr(module, name))
        constexprs = [key for key in kwargs if key not in ("num_warps", "num_stages")]
        assert len(args) + len(constexprs) == len(getattr(module, name).arg_names), name  # positional, then constexprs
        variants = [args]
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.dtype in (torch.float32, torch.int32, torch.int64):
                moved = torch.empty(a.numel() + 1, dtype=a.dtype, device=a.device)[1:]
                variants.append(args[:i] + (moved,) + args[i + 1:])
            elif isinstance(a, int):
                for value in (1, 16, 17, 2**31 + 16):
                    variants.append(args[:i] + (value,) + args[i + 1:])
        seen = {}
        for variant in variants:
            _, specialization, _ = binder(*variant, **kwargs)
            seen.setdefault(host.relaunch_key(variant), set()).add(repr(specialization))
        assert all(len(s) == 1 for s in seen.values()), name
        assert len({s for specs in seen.values() for s in specs}) > 1, name  # the variants reach other specializations
