"""The one attention op: a ``torch.library`` custom op with fake and autograd registrations.

``attention(...)`` is the single entry point every integration path calls. Inside the op, the
backend is chosen once per call:

* ``triton``: the kernels in :mod:`hf_attn_plugin.kernels` (CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` for tests);
* ``reference``: :func:`hf_attn_plugin.reference.attention_reference` (plain PyTorch).

``HF_ATTN_PLUGIN_BACKEND=auto|triton|reference`` picks it (``auto``: triton on CUDA, reference on
CPU). ``torch.compile`` sees one opaque op per direction, so a compiled model has no graph breaks
around attention.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference

__all__ = ["attention", "backend_for", "BACKENDS"]

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


def _window(window: int) -> Optional[int]:
    return window if window > 0 else None


def _softcap(softcap: float) -> Optional[float]:
    return softcap if softcap > 0 else None


@torch.library.custom_op("hf_attn_plugin::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend_for(q.device) == "triton":
        from .kernels import flash

        return flash.flash_attn_forward(
            q, k, v, segments, sinks, scale, causal, window, softcap, max_seqlen_q, max_seqlen_k
        )
    out, lse = reference.attention_reference(
        q, k, v, scale=scale, causal=causal, window=_window(window), softcap=_softcap(softcap),
        sinks=sinks, segments=segments,
    )
    return out.contiguous(), lse.contiguous()


@_attention_fwd.register_fake
def _(q, k, v, segments, sinks, scale, causal, window, softcap, max_seqlen_q, max_seqlen_k):
    batch, seqlen_q, heads_q, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hf_attn_plugin::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segments: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dsinks)``; ``dsinks`` is an empty tensor when there are no sinks."""
    dout = dout.contiguous()  # a grad of sum() has stride 0
    if backend_for(q.device) == "triton":
        from .kernels import flash

        dq, dk, dv, dsinks = flash.flash_attn_backward(
            dout, q, k, v, out, lse, segments, sinks, scale, causal, window, softcap, max_seqlen_q, max_seqlen_k
        )
    else:
        dq, dk, dv, dsinks = _reference_backward(dout, q, k, v, segments, sinks, scale, causal, window, softcap)
    if dsinks is None:
        dsinks = q.new_empty(0, dtype=torch.float32)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dsinks.float()


def _reference_backward(dout, q, k, v, segments, sinks, scale, causal, window, softcap):
    return reference.attention_reference_backward(
        dout, q, k, v, scale=scale, causal=causal, window=_window(window), softcap=_softcap(softcap),
        sinks=sinks, segments=segments,
    )


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, segments, sinks, scale, causal, window, softcap, max_seqlen_q, max_seqlen_k):
    dsinks = torch.empty_like(sinks, dtype=torch.float32) if sinks is not None else q.new_empty(0, dtype=torch.float32)
    grads = (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    return *grads, dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, segments, sinks, scale, causal, window, softcap, max_seqlen_q, max_seqlen_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, segments, sinks)
    ctx.args = (scale, causal, window, softcap, max_seqlen_q, max_seqlen_k)
    ctx.has_sinks = sinks is not None


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, segments, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = _attention_bwd(dout, q, k, v, out, lse, segments, sinks, *ctx.args)
    dsinks = dsinks.to(sinks.dtype) if ctx.has_sinks else None
    return dq, dk, dv, None, dsinks, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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
):
    """Flash attention on ``[B, S, H, D]`` tensors; semantics in :mod:`hf_attn_plugin.reference`.

    ``max_seqlen_q``/``max_seqlen_k`` bound the segment lengths (they size the kernel grid); they
    default to the padded lengths ``Sq``/``Sk``, which is always safe.
    """
    _check_inputs(q, k, v, sinks, segments)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = _attention_fwd(
        q, k, v, segments, sinks, scale, bool(causal),
        int(window) if window else 0,
        float(softcap) if softcap else 0.0,
        int(max_seqlen_q or q.shape[1]),
        int(max_seqlen_k or k.shape[1]),
    )
    return (out, lse) if return_lse else out


def _check_inputs(q, k, v, sinks, segments) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"key and value shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch or head_dim of q {tuple(q.shape)} does not match k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must have one logit per query head ({q.shape[2]}), got {tuple(sinks.shape)}")
    if segments is not None and (segments.dim() != 2 or segments.shape[1] != 5 or segments.dtype != torch.int32):
        raise ValueError("segments must be an int32 tensor [N, 5] of (batch, q_start, q_end, k_start, k_end)")
