"""Pure-PyTorch attention with exactly the semantics of the Triton kernels.

This module is the test oracle and the CPU execution path. Every kernel in
``hf_attn_plugin.kernels`` computes the function defined here; if the two ever
disagree, this file is the specification.

Layout (the "flash" layout, the one transformers' query views already have in memory):

* ``q``: ``[B, Sq, Hq, D]``; ``k``: ``[B, Sk, Hkv, D]`` and ``v``: ``[B, Sk, Hkv, Dv]`` with ``Hq % Hkv == 0``
  (``Dv`` may differ from ``D``: multi-head latent attention, DeepSeek-V2/V3).
  Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA / MQA, never repeated).
* ``out``: ``[B, Sq, Hq, Dv]`` in the dtype of ``q``; ``lse``: ``[B, Hq, Sq]`` float32, natural log.

Segments describe padding and packing without copies. ``segments`` is an int32 tensor
``[N, 5]`` of rows ``(batch, q_start, q_end, k_start, k_end)``: queries ``q[batch, q_start:q_end]``
attend to keys ``k[batch, k_start:k_end]``. ``None`` means one segment per batch row covering
everything. Positions are bottom-right aligned inside a segment: query ``i`` sits at key position
``i + (k_end - q_end)``, which is what a KV cache (keys = past + new tokens) needs.

Inside a segment, query ``i`` may see key ``j`` when (``o = k_end - q_end``)

* causal: ``j <= i + o``;
* sliding window ``W`` (transformers' convention, ``W`` keys including itself): ``j > i + o - W``.

Scores are ``s = scale * q.k``, then ``softcap * tanh(s / softcap)`` when ``softcap`` is set
(Gemma 2), then masked. ``sinks`` (``[Hq]``, GPT-OSS ``s_aux``) add one logit per head to the
softmax denominator only, for every query row that belongs to a segment. A row with no visible key
and no sink (padding, or outside every segment) gives a zero output and ``lse = 0`` (finite, so a
backward pass never produces NaN); gradients through it are zero.

Attention dropout (training): with ``dropout_p > 0`` and a boolean ``dropout_mask`` ``[B, Hq, Sq, Sk]`` (True =
kept), the probabilities are multiplied by ``mask / (1 - dropout_p)`` before the product with ``V``; the
softmax normaliser and ``lse`` are unaffected, and the sink's share of the denominator is never dropped. The
Triton kernels draw their mask in-kernel (``kernels.flash.dropout_mask`` materialises it for a seed).
"""

from __future__ import annotations

import math

import torch

from .kernels.params import AttentionParams

__all__ = [
    "attention_reference",
    "attention_reference_backward",
    "attention_mask_from_segments",
    "rows_in_segments",
    "full_segments",
]


def full_segments(batch: int, seqlen_q: int, seqlen_k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Segments for an unpadded batch: each row is one sequence."""
    seg = torch.empty(batch, 5, dtype=torch.int32, device=device)
    seg[:, 0] = torch.arange(batch, dtype=torch.int32, device=device)
    seg[:, 1] = 0
    seg[:, 2] = seqlen_q
    seg[:, 3] = 0
    seg[:, 4] = seqlen_k
    return seg


def attention_mask_from_segments(
    segments: torch.Tensor | None,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean ``[B, Sq, Sk]`` mask, True where query ``i`` may attend to key ``j`` (``window`` ``None`` or 0: none)."""
    if segments is None:
        segments = full_segments(batch, seqlen_q, seqlen_k)
    i = torch.arange(seqlen_q, device=device).view(1, -1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, 1, -1)
    seg = segments.to(device=device, dtype=torch.int64)
    b, qs, qe, ks, ke = (seg[:, c].view(-1, 1, 1) for c in range(5))
    allowed = (i >= qs) & (i < qe) & (j >= ks) & (j < ke)  # [N, Sq, Sk]
    pos = i + (ke - qe)  # key position of query i
    if causal:
        allowed &= j <= pos
    if window:
        allowed &= j > pos - window
    # Segments may share a batch row (packing): OR them into their rows.
    counts = torch.zeros(batch, seqlen_q, seqlen_k, dtype=torch.int32, device=device)
    return counts.index_add_(0, seg[:, 0], allowed.int()) > 0


def rows_in_segments(segments: torch.Tensor | None, batch: int, seqlen_q: int, device="cpu") -> torch.Tensor:
    """Boolean ``[B, Sq]``: True for query rows that belong to some segment."""
    if segments is None:
        return torch.ones(batch, seqlen_q, dtype=torch.bool, device=device)
    seg = segments.to(device=device, dtype=torch.int64)
    i = torch.arange(seqlen_q, device=device).view(1, -1)
    inside = (i >= seg[:, 1:2]) & (i < seg[:, 2:3])
    counts = torch.zeros(batch, seqlen_q, dtype=torch.int32, device=device)
    return counts.index_add_(0, seg[:, 0], inside.int()) > 0


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams | None = None, *,
                        dropout_mask: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
                        **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q``, ``k``, ``v`` with ``params`` (an :class:`AttentionParams`), or with its keywords
    (``scale``, ``causal`` (default True), ``window``, ``softcap``, ``sinks``, ``segments``, ``dropout_p``: see
    :meth:`AttentionParams.create`). Returns ``(out, lse)``; see the module doc.

    ``compute_dtype``: the dtype of every operation (default float32, float64 for float64 inputs); tests pass the
    inputs' own dtype for "PyTorch at the kernel's precision". Differentiable with respect to ``q``, ``k``, ``v``
    and ``sinks``. ``dropout_mask`` (bool ``[B, Hq, Sq, Sk]``) is required when ``dropout_p > 0``.
    """
    params = AttentionParams.resolve(params, q.shape[-1], options)
    probs, _, lse, vf = _probabilities(q, k, v, params, compute_dtype)
    probs = _dropped(probs, params.dropout_p, dropout_mask)
    batch, seqlen_q, heads_q = q.shape[:3]
    out = torch.matmul(probs, vf)  # [B, Hkv, G, Sq, Dv]
    out = out.reshape(batch, heads_q, seqlen_q, v.shape[-1]).permute(0, 2, 1, 3).to(q.dtype)
    return out, lse.reshape(batch, heads_q, seqlen_q).float()


def _dropped(probs, dropout_p, dropout_mask):
    """``probs * mask / (1 - p)`` (``probs`` ``[B, Hkv, G, Sq, Sk]``, ``mask`` ``[B, Hq, Sq, Sk]``)."""
    if not dropout_p:
        return probs
    if dropout_mask is None:
        raise ValueError("dropout_p > 0 needs dropout_mask: a bool [B, Hq, Sq, Sk] tensor, True where kept")
    batch, heads_kv, group, seqlen_q, seqlen_k = probs.shape
    if dropout_mask.shape != (batch, heads_kv * group, seqlen_q, seqlen_k):
        raise ValueError(f"dropout_mask must be [B, Hq, Sq, Sk] = {(batch, heads_kv * group, seqlen_q, seqlen_k)}, "
                         f"got {tuple(dropout_mask.shape)}")
    keep = dropout_mask.to(probs.device).reshape(probs.shape)
    return probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))


def _probabilities(q, k, v, params: AttentionParams, compute_dtype: torch.dtype | None):
    """Softmax probabilities ``[B, Hkv, G, Sq, Sk]`` plus what the backward pass reuses."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale, softcap, sinks, segments = params.scale, params.softcap, params.sinks, params.segments
    compute = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)

    # [B, Hkv, G, Sq, D] x [B, Hkv, 1, D, Sk]: GQA by broadcasting, no repeated K/V.
    qf = q.to(compute).permute(0, 2, 1, 3).reshape(batch, heads_kv, group, seqlen_q, head_dim)
    kf = k.to(compute).permute(0, 2, 1, 3).unsqueeze(2)
    vf = v.to(compute).permute(0, 2, 1, 3).unsqueeze(2)
    scores = raw_scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)

    allowed = attention_mask_from_segments(
        segments, batch, seqlen_q, seqlen_k, causal=params.causal, window=params.window, device=q.device
    )[:, None, None]
    scores = scores.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        in_segment = rows_in_segments(segments, batch, seqlen_q, device=q.device).view(batch, 1, 1, seqlen_q, 1)
        sink = sinks.to(compute).view(1, heads_kv, group, 1, 1).expand(batch, -1, -1, seqlen_q, 1)
        logits = torch.cat([scores, sink.masked_fill(~in_segment, -math.inf)], dim=-1)
    else:
        logits = scores

    # Rows with no finite logit: keep logsumexp (and its gradient) away from -inf - -inf.
    live = ~torch.isneginf(logits).all(-1, keepdim=True)
    lse = torch.logsumexp(logits.masked_fill(~live, 0.0), dim=-1, keepdim=True).masked_fill(~live, 0.0)
    probs = torch.exp(scores - lse)  # masked entries: exp(-inf) = 0
    return probs, (qf, kf, raw_scores, group), lse, vf


def attention_reference_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 params: AttentionParams | None = None, *, dropout_mask: torch.Tensor | None = None,
                                 compute_dtype: torch.dtype | None = None, **options
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(dq, dk, dv, dsinks)`` of :func:`attention_reference`, written out (the FA2 backward maths).

    With ``P`` the probabilities, ``O = P V`` and ``Delta_i = sum_d dO_id O_id``:
    ``dV = P^T dO``, ``dS = P * (dO V^T - Delta)``, through the softcap ``dS *= 1 - tanh^2``,
    ``dQ = scale dS K``, ``dK = scale dS^T Q``, and for a sink ``dsink_h = -sum_i P_sink,i Delta_i``. With
    dropout (``Pd = P * mask / (1 - p)``, ``O = Pd V``): ``dV = Pd^T dO`` and ``dS = P * (dPd - Delta)`` with
    ``dPd = (dO V^T) * mask / (1 - p)``. The other arguments: as for :func:`attention_reference`.
    """
    params = AttentionParams.resolve(params, q.shape[-1], options)
    probs, (qf, kf, raw_scores, group), lse, vf = _probabilities(q, k, v, params, compute_dtype)
    scale, softcap, sinks, dropout_p = params.scale, params.softcap, params.sinks, params.dropout_p
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    do = dout.to(probs.dtype).permute(0, 2, 1, 3).reshape(batch, heads_kv, group, seqlen_q, v.shape[-1])
    dropped = _dropped(probs, dropout_p, dropout_mask)
    out = torch.matmul(dropped, vf)
    delta = (do * out).sum(-1, keepdim=True)
    dv = torch.matmul(dropped.transpose(-1, -2), do).sum(2)  # sum over the group's query heads
    dp = torch.matmul(do, vf.transpose(-1, -2))
    if dropout_p:  # d(dropped)/d(probs) = mask / (1 - p)
        dp = _dropped(dp, dropout_p, dropout_mask)
    ds = probs * (dp - delta)
    if softcap:
        ds = ds * (1 - torch.tanh(raw_scores / softcap) ** 2)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf).sum(2) * scale
    dsinks = None
    if sinks is not None:
        sink_prob = torch.exp(sinks.to(probs.dtype).view(1, heads_kv, group, 1, 1) - lse)
        in_segment = rows_in_segments(params.segments, batch, seqlen_q, device=q.device).view(batch, 1, 1, seqlen_q, 1)
        dsinks = -(sink_prob * delta * in_segment).sum((0, 3, 4)).reshape(heads_q)
    dq = dq.reshape(batch, heads_q, seqlen_q, head_dim).permute(0, 2, 1, 3).to(q.dtype)
    dk = dk.permute(0, 2, 1, 3).to(k.dtype)
    dv = dv.permute(0, 2, 1, 3).to(v.dtype)
    return dq, dk, dv, dsinks
