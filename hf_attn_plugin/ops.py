"""The one attention op: a ``torch.library`` custom op with fake and autograd registrations.

``attention(q, k, v, causal=..., ...)`` is the public entry point: it validates its keywords and builds one
:class:`AttentionParams` (``kernels/params.py``); the integration builds its own and calls
:func:`attention_trusted`. The op's schema carries the params flat (schema types); its body rebuilds the object
for the kernels or the reference. Inside the op, the backend is chosen once per call:

* ``triton``: the kernels in :mod:`hf_attn_plugin.kernels` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` for tests);
* ``reference``: :func:`hf_attn_plugin.reference.attention_reference` (plain PyTorch).

``HF_ATTN_PLUGIN_BACKEND=auto|triton|reference`` picks it (``auto``: triton on CUDA, reference on
CPU). ``torch.compile`` sees one opaque op per direction, so a compiled model has no graph breaks
around attention.

Input checks. :func:`attention` is the public boundary and validates everything it is given; the
integration (which builds its own segments) calls :func:`attention_trusted`, which runs only the free
checks. ``HF_ATTN_PLUGIN_CHECKS`` picks how much :func:`attention` checks the *values* of user tensors
(segments, sinks):

* ``0``: no value checks (shapes, dtypes, devices and scalar arguments are always checked: they are free);
* ``1`` (default): value checks that never add a host synchronisation: on CPU tensors they run on the
  host and raise ``ValueError``; on CUDA tensors they are device-side asserts (``torch._assert_async``),
  which fail at the next synchronisation with a device-side assertion error (the CUDA context is then
  unusable, so rerun with ``full`` to see which input was wrong);
* ``full``: every value check on the host, raising ``ValueError`` with details; one host
  synchronisation per call on CUDA. Use it when debugging.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Optional

import torch

from . import _checks, reference
from .kernels.params import AttentionParams

__all__ = ["attention", "attention_trusted", "AttentionParams", "check_segments", "backend_for", "dropout_seed",
           "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")


def backend_for(device: torch.device) -> str:
    """The backend that will run on ``device``, from ``HF_ATTN_PLUGIN_BACKEND``."""
    choice = os.environ.get("HF_ATTN_PLUGIN_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"HF_ATTN_PLUGIN_BACKEND={choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "HF_ATTN_PLUGIN_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 to run the Triton "
            f"interpreter on {device.type} tensors, for tests)"
        )
    return choice


# The custom ops' arguments after their tensors: the fields of AttentionParams, flat (schema types), in the order that
# _run passes them and _op_params reads them. Written once, for both directions.
_PARAMS_SCHEMA = ("Tensor? segments, Tensor? sinks, float scale, bool causal, SymInt window, float softcap, "
                  "SymInt max_seqlen_q, SymInt max_seqlen_k, float dropout_p=0., Tensor? dropout_seed=None")


def _op_params(segments, sinks, scale, causal, window, softcap, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               dropout_seed=None) -> AttentionParams:
    """The custom ops' flat arguments (normalised by :meth:`AttentionParams.create` before :func:`_run` flattened
    them) as one object again."""
    return AttentionParams(scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks, segments=segments,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, seed=dropout_seed)


@torch.library.custom_op("hf_attn_plugin::attention_fwd", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_PARAMS_SCHEMA}) -> (Tensor, Tensor)")
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *flat) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``; ``flat``: the params in ``_PARAMS_SCHEMA``'s order."""
    return _forward(q, k, v, _op_params(*flat))


def _forward(q, k, v, params: AttentionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward on the call's backend: the body of the op and of the eager path (:class:`_EagerAttention`)."""
    if backend_for(q.device) == "triton":
        from .kernels import flash

        return flash.flash_attn_forward(q, k, v, params)
    out, lse = reference.attention_reference(q, k, v, params, dropout_mask=_reference_dropout_mask(q, k, params))
    return out.contiguous(), lse.contiguous()


def dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh attention-dropout seed: one int64 drawn with ``torch.randint`` from the default generator of
    ``device``. Why a drawn seed (rather than reading the generator's Philox seed/offset on the host and advancing
    the offset, as torch's fused kernels do): it stays on the device (no host synchronisation, no hidden
    generator state inside the op), ``torch.compile`` traces it as an ordinary random op, and a CUDA graph replay
    draws a new one (torch registers the generator with the graph); ``torch.manual_seed`` reproduces it, and each
    call advances the generator like any other random op. The backward regenerates the mask from the same seed."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _reference_dropout_mask(q, k, params: AttentionParams) -> Optional[torch.Tensor]:
    """The reference backend's mask ``[B, Hq, Sq, Sk]`` for ``params.seed`` (torch's generator seeded with it, so
    the backward gets the same mask; the Triton kernels draw a different one, with Philox, from the same seed)."""
    if not params.dropout_p:
        return None
    gen = torch.Generator(device=q.device).manual_seed(int(params.seed.reshape(-1)[0]))
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return torch.rand(shape, generator=gen, device=q.device) >= params.dropout_p


@_attention_fwd.register_fake
def _(q, k, v, *flat):
    batch, seqlen_q, heads_q, _ = q.shape
    out = q.new_empty((batch, seqlen_q, heads_q, v.shape[-1]))
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(
    "hf_attn_plugin::attention_bwd", mutates_args=(),
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_PARAMS_SCHEMA}) "
           "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _attention_bwd(dout, q, k, v, out, lse, *flat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dsinks)``; ``dsinks`` is an empty tensor when there are no sinks. ``flat``: the
    forward's params in ``_PARAMS_SCHEMA``'s order."""
    dq, dk, dv, dsinks = _backward_grads(dout, q, k, v, out, lse, _op_params(*flat))
    if dsinks is None:
        dsinks = q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dsinks.float()


def _backward_grads(dout, q, k, v, out, lse, params: AttentionParams):
    """``(dq, dk, dv, dsinks or None)`` on the call's backend: the body of the op and of the eager path."""
    dout = dout.contiguous()  # a grad of sum() has stride 0
    if backend_for(q.device) == "triton":
        from .kernels import flash

        dq, dk, dv, dsinks = flash.flash_attn_backward(dout, q, k, v, out, lse, params)
    else:
        dq, dk, dv, dsinks = reference.attention_reference_backward(
            dout, q, k, v, params, dropout_mask=_reference_dropout_mask(q, k, params))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, segments, sinks, *flat):
    dsinks = torch.empty_like(sinks, dtype=torch.float32) if sinks is not None else q.new_empty(0, dtype=torch.float32)
    grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    return *grads, dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, segments, sinks, *scalars, seed = inputs  # scalars: scale .. dropout_p, in the op's order
    out, lse = output
    ctx.mark_non_differentiable(lse)  # no gradient flows through the LSE: say so rather than drop one silently
    ctx.set_materialize_grads(False)  # (no zero-filled dlse each backward)
    ctx.save_for_backward(q, k, v, out, lse, segments, sinks, seed)
    ctx.scalars = scalars
    ctx.has_sinks = sinks is not None


def _backward(ctx, dout, dlse):
    if dout is None:  # (grads are not materialised; only ``out`` is differentiable)
        return (None,) * 13
    q, k, v, out, lse, segments, sinks, seed = ctx.saved_tensors
    dq, dk, dv, dsinks = _attention_bwd(dout, q, k, v, out, lse, segments, sinks, *ctx.scalars, seed)
    dsinks = dsinks.to(sinks.dtype) if ctx.has_sinks else None
    return dq, dk, dv, None, dsinks, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """Eager calls: the op's own forward and backward bodies under a plain ``autograd.Function``.

    Same kernels, same results as the op; what it skips is ``torch.library``'s Python-level dispatch of a custom op
    (argument binding, schema and aliasing checks, the autograd wrapper), measured on the H200 machine at ~45 us per
    forward and ~300 us per forward + backward of host time: more than the kernels take at BERT-sized shapes. Traced
    calls (``torch.compile``, fake or functional tensors) keep the op, which is what the compiler must see."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, params: AttentionParams):
        out, lse = _forward(q, k, v, params)
        ctx.mark_non_differentiable(lse)  # as the op (_setup_context)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, params.segments, sinks, params.seed)
        ctx.params = dataclasses.replace(params, segments=None, sinks=None, seed=None)  # tensors saved above
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:
            return None, None, None, None, None
        q, k, v, out, lse, segments, sinks, seed = ctx.saved_tensors
        params = dataclasses.replace(ctx.params, segments=segments, sinks=sinks, seed=seed)
        dq, dk, dv, dsinks = _backward_grads(dout, q, k, v, out, lse, params)
        dsinks = dsinks.to(sinks.dtype) if dsinks is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None


def _traced(*tensors) -> bool:
    """Whether this call is being traced (``torch.compile``, or fake / functional / subclass tensors): the op path."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    dropout_p: float = 0.0,
):
    """Flash attention on ``[B, S, H, D]`` tensors; semantics in :mod:`hf_attn_plugin.reference`. ``v`` may have a head
    dim of its own (``[B, Sk, Hkv, Dv]``, MLA); the output is then ``[B, Sq, Hq, Dv]``.

    ``dropout_p``: attention dropout in ``[0, 1)`` (training); the mask comes from a seed drawn from torch's
    default generator of the device (:func:`dropout_seed`), so ``torch.manual_seed`` reproduces it.

    ``window``: ``None`` or ``0`` for none, else a positive integer (keys seen, including the query's own).
    ``softcap``: ``None`` or ``0`` for none, else a positive finite number. ``sinks``: one finite (or
    ``-inf``) logit per query head. ``segments``: int32 ``[N, 5]`` rows ``(batch, q_start, q_end, k_start,
    k_end)`` with ``0 <= q_start <= q_end <= Sq``, ``0 <= k_start <= k_end <= Sk``, ``0 <= batch < B``
    and no two non-empty query ranges, nor two non-empty key ranges, of one batch row overlapping.
    ``max_seqlen_q``/``max_seqlen_k`` bound the segment lengths (they size the kernel grid); they
    default to the padded lengths ``Sq``/``Sk``, which is always safe. Values are checked according to
    ``HF_ATTN_PLUGIN_CHECKS`` (module docstring). ``return_lse``: also the log-sum-exp ``[B, Hq, Sq]`` (float32,
    natural log), which is not differentiable (gradients flow through the output only).
    """
    _check_inputs(q, k, v, sinks, segments)
    _check_scalars(window, softcap, dropout_p, max_seqlen_q, max_seqlen_k)
    params = AttentionParams.create(
        q.shape[-1], scale=scale, causal=causal, window=window, softcap=softcap, sinks=sinks, segments=segments,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
    )
    level = _checks.checks_level()
    if level != _checks.OFF and q.device.type != "meta":
        host = level == _checks.FULL or (q.device.type == "cpu" and not torch.compiler.is_compiling())
        if segments is not None:
            check_segments(segments, q.shape[0], q.shape[1], k.shape[1], *params.max_seqlens(q.shape[1], k.shape[1]),
                           host=host)
        if sinks is not None:
            _require(~(torch.isnan(sinks) | torch.isposinf(sinks)).any(), host,
                     lambda: f"sinks must be finite or -inf (a +inf or NaN sink makes every output row undefined), "
                             f"got {sinks.tolist()}")
    return _run(q, k, v, params, return_lse)


def attention_trusted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams | None = None, *,
                      return_lse: bool = False, **options):
    """:func:`attention` for arguments the package built itself (valid by construction): ``params`` from
    :meth:`AttentionParams.create` (what :func:`hf_attn_plugin.integration.describe_call` returns), or its keywords
    (``options``). Only the free checks (shapes, dtypes, devices), never a look at tensor values; a dropout seed is
    drawn when ``params`` has ``dropout_p`` but no ``seed``. Internal: the integration calls it."""
    params = AttentionParams.resolve(params, q.shape[-1], options)
    _check_inputs(q, k, v, params.sinks, params.segments)
    return _run(q, k, v, params, return_lse)


def _run(q, k, v, params: AttentionParams, return_lse: bool):
    seed = params.seed
    if params.dropout_p and seed is None:
        seed = dropout_seed(q.device)
    if _traced(q, k, v):
        out, lse = _attention_fwd(
            q, k, v, params.segments, params.sinks, params.scale, params.causal, params.window, params.softcap,
            *params.max_seqlens(q.shape[1], k.shape[1]), params.dropout_p, seed,
        )
    else:
        if seed is not params.seed:
            params = dataclasses.replace(params, seed=seed)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, params.sinks)):
            out, lse = _EagerAttention.apply(q, k, v, params.sinks, params)
        else:
            out, lse = _forward(q, k, v, params)
    return (out, lse) if return_lse else out


def _require(ok: torch.Tensor, host: bool, message) -> None:
    """Raise ``ValueError(message())`` unless ``ok`` (a 0-d bool tensor): on the host when ``host``, else as a
    device-side assert (no synchronisation; it fires at the next one)."""
    if host:
        if not bool(ok):
            raise ValueError(message())
    else:
        torch._assert_async(ok, "hf_attn_plugin: invalid attention input (rerun with HF_ATTN_PLUGIN_CHECKS=full "
                                "for the details)")


def check_segments(segments: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int, max_seqlen_q: int,
                   max_seqlen_k: int, *, host: bool = True) -> None:
    """Check the values of user segments (see :func:`attention`): ranges inside their rows, a batch index in
    range, no overlapping query ranges in a batch row, lengths within ``max_seqlen_q/k``.

    ``host=True`` raises ``ValueError`` (reads the values: a synchronisation on CUDA); ``host=False``
    enqueues device-side asserts.
    """
    if segments.shape[0] == 0:
        return
    seg = segments.to(torch.int64)
    b, qs, qe, ks, ke = seg.unbind(1)
    bounds = ((b >= 0) & (b < batch) & (qs >= 0) & (qs <= qe) & (qe <= seqlen_q)
              & (ks >= 0) & (ks <= ke) & (ke <= seqlen_k))
    lengths = ((qe - qs) <= max_seqlen_q) & ((ke - ks) <= max_seqlen_k)
    overlap_q, order_q = _overlaps(b, qs, qe, seqlen_q)
    overlap_k, order_k = _overlaps(b, ks, ke, seqlen_k)

    def where(mask):
        return [tuple(r) for r in segments[mask].tolist()[:3]]

    _require(bounds.all(), host, lambda: (
        f"segments out of range for batch {batch}, Sq {seqlen_q}, Sk {seqlen_k}: rows (batch, q_start, q_end, "
        f"k_start, k_end) need 0 <= batch < {batch}, 0 <= q_start <= q_end <= {seqlen_q} and "
        f"0 <= k_start <= k_end <= {seqlen_k}; offending rows: {where(~bounds)}"))
    _require(~overlap_q.any(), host, lambda: (
        "segments overlap: two non-empty query ranges of one batch row share queries (each query row "
        f"belongs to at most one segment); offending rows: {where(order_q[1:][overlap_q])}"))
    _require(~overlap_k.any(), host, lambda: (
        "segments overlap: two non-empty key ranges of one batch row share keys (each key row belongs to at "
        f"most one segment, or its gradients would not add up); offending rows: {where(order_k[1:][overlap_k])}"))
    _require(lengths.all(), host, lambda: (
        f"max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k} are smaller than the longest segment "
        f"(rows {where(~lengths)}): pass the true maxima, or leave them None (the padded lengths, always safe)"))


def _overlaps(b, start, end, length):
    """Per adjacent pair of the non-empty ranges sorted by (batch, start) (empty ones last): do they overlap?
    Ranges sorted by start are disjoint iff every adjacent pair is. Returns (overlap [N-1], order [N])."""
    nonempty = end > start
    order = torch.where(nonempty, b * (length + 1) + start, torch.iinfo(torch.int64).max).argsort()
    sb, ss, se, sne = b[order], start[order], end[order], nonempty[order]
    return sne[1:] & sne[:-1] & (sb[1:] == sb[:-1]) & (ss[1:] < se[:-1]), order


def _check_scalars(window, softcap, dropout_p, max_seqlen_q, max_seqlen_k) -> None:
    """The user's scalar arguments (``None`` or 0 always mean off / the padded length)."""
    for name, value in (("window", window), ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is not None:
            _checks.integer(name, value)
    if not (softcap is None or (isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)
                                and math.isfinite(softcap) and softcap >= 0)):
        raise ValueError(f"softcap must be None or a finite non-negative number (0 or None for no softcap), "
                         f"got {softcap!r}")
    if not (dropout_p is None or (isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool)
                                  and 0.0 <= dropout_p < 1.0)):
        raise ValueError(f"dropout_p must be a number in [0, 1) (0 or None for no dropout), got {dropout_p!r}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(q, k, v, sinks, segments) -> None:
    """The free checks: shapes, dtypes, devices (no tensor value is read)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3]:  # (v's head dim may differ from k's: MLA)
        raise ValueError(f"key and value must have the same batch, sequence length and heads [B, Sk, Hkv] (their head "
                         f"dims may differ), got k {tuple(k.shape)} vs v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch or head_dim of q {tuple(q.shape)} does not match k {tuple(k.shape)}")
    if k.shape[2] == 0 or q.shape[2] == 0:
        raise ValueError(f"q and k/v need at least one head, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v), ("sinks", sinks), ("segments", segments)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: move every input to one device")
    if sinks is not None and (sinks.shape != (q.shape[2],) or not sinks.is_floating_point()):
        raise ValueError(f"sinks must be a floating-point tensor with one logit per query head ({q.shape[2]}), "
                         f"got {sinks.dtype} {tuple(sinks.shape)}")
    if segments is not None and (segments.dim() != 2 or segments.shape[1] != 5 or segments.dtype != torch.int32):
        raise ValueError("segments must be an int32 tensor [N, 5] of (batch, q_start, q_end, k_start, k_end)")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and backend_for(q.device) == "triton":
        raise ValueError(
            "bfloat16 on the Triton interpreter (CPU tensors) gives wrong results (an upstream interpreter bug in "
            "bf16 tl.dot): use float32 or float16 under TRITON_INTERPRET=1, or HF_ATTN_PLUGIN_BACKEND=reference"
        )
