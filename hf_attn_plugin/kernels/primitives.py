"""Triton building blocks of attention shared by the flash kernels (``flash.py``) and the paged kernels (``paged.py``).

Scores live in base 2: a kernel works with ``s2 = log2(e) * s`` (``s`` = the logit after scale and softcap), so
every exponential is one ``exp2`` and a running log-sum-exp is base 2 until it is stored (natural log: times
``LN2``). The scale is folded into ``log2(e)`` on the host (:func:`score_scales`).

* :func:`scores` - ``qk`` to base-2 logits: scale, or softcap ``cap * tanh(scale * qk / cap)``.
* :func:`mask_scores` - ``-inf`` for keys a query does not see: key range, causal (bottom-right aligned: query at
  key position ``pos`` sees keys ``<= pos``), sliding window (keys ``> pos - window``).
* :func:`online_softmax_step` - one key tile of FlashAttention-2's online softmax: new running max, rescale
  factor of what was accumulated so far, probabilities, running sum.
* :func:`finish_softmax` - the output ``acc / l`` and the base-2 log-sum-exp; 0 and ``-inf`` for rows that saw
  no key.
* :func:`scores_grad` - ``dL/d(scale * qk)`` from probabilities, ``dL/dP`` and ``delta`` (softcap included).

Every flag is a ``tl.constexpr``: a disabled feature costs no instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["LOG2E", "LN2", "LENGTH_ARGS", "score_scales", "tanh", "scores", "mask_scores", "online_softmax_step", "finish_softmax",
           "scores_grad"]

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural-log quantities -> base 2
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): base 2 -> natural log

# Triton compiles a kernel once per value class of its integer arguments: == 1, divisible by 16, other. An argument
# that follows a call's lengths (a sequence length, the row stride of an lse buffer or of a block table, a split count)
# changes class as the lengths grow, and each new class is a new compilation in the middle of a run: on the H200 the
# decode kernel stalled ~0.8 s at the 16th new token of a 512-token prompt, when the key count (a block-table row
# stride) first became a multiple of 16. Kernels list such arguments in ``do_not_specialize_on_alignment`` (the
# ``== 1`` class stays); none of them offsets a pointer whose alignment a vector load needs.
LENGTH_ARGS = ("seqlen_q", "seqlen_k")


def score_scales(scale: float, softcap: float) -> tuple[float, float, float]:
    """Host side of :func:`scores`: its ``(scale2, cap_scale, cap2)`` for a softmax ``scale`` and a ``softcap``
    (0: none)."""
    return scale * LOG2E.value, (scale / softcap if softcap else 0.0), softcap * LOG2E.value


@triton.jit
def tanh(x):
    """``1 - 2 / (e^{2x} + 1)`` through ``exp2``: saturates to +-1 without NaN for large ``|x|``."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def scores(qk, scale2, cap_scale, cap2, SOFTCAP: tl.constexpr):
    """Base-2 logits ``log2(e) * s`` of the dot products ``qk``, and ``t = tanh`` (the softcap gradient needs it).

    Without softcap ``s = scale * qk``: ``scale2 = scale * log2(e)``. With it ``s = cap * tanh(scale * qk / cap)``:
    ``cap_scale = scale / cap`` and ``cap2 = cap * log2(e)``. Without softcap ``t`` is ``qk`` (unused).
    """
    if SOFTCAP:
        t = tanh(qk * cap_scale)
        s = t * cap2
    else:
        t = qk
        s = qk * scale2
    return s, t


@triton.jit
def mask_scores(s, pos, cols, col_start, col_end, window, CHECK_START: tl.constexpr, CHECK_END: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``s`` with ``-inf`` where key ``cols`` is invisible to the query rows at key positions ``pos``.

    ``pos`` and ``cols`` broadcast against ``s`` (rows or keys may be either axis). Visible: ``col_start <= cols``
    (``CHECK_START``), ``cols < col_end`` (``CHECK_END``), ``cols <= pos`` (``CAUSAL``: bottom-right aligned, the
    caller puts query row ``r`` of a sequence with ``len_q`` queries and ``len_k`` keys at ``pos = r + len_k -
    len_q``) and ``cols > pos - window`` (``WINDOW``: the ``window`` keys up to the query's position).
    """
    if CHECK_START or CHECK_END:  # the key range: both bounds in one select (compared on the key axis alone)
        if not CHECK_START:
            in_range = cols < col_end
        elif not CHECK_END:
            in_range = cols >= col_start
        else:
            in_range = (cols >= col_start) & (cols < col_end)
        s = tl.where(in_range, s, float("-inf"))
    if CAUSAL:
        s = tl.where(cols <= pos, s, float("-inf"))
    if WINDOW:
        s = tl.where(cols > pos - window, s, float("-inf"))
    return s


@triton.jit
def online_softmax_step(s, m_i, l_i, MASKED: tl.constexpr):
    """One key tile ``s`` ``[rows, keys]`` (base 2) of the online softmax over running max ``m_i`` and sum ``l_i``.

    Returns ``(p, alpha, m_new, l_new)``: ``p = exp2(s - m_new)``, ``alpha = exp2(m_i - m_new)`` (multiply what
    was accumulated with the old max by it) and ``l_new = alpha * l_i + rowsum(p)``. ``MASKED``: rows may have
    seen only ``-inf`` so far; their max is taken as 0 for the exponentials, so that ``exp2(-inf - -inf)`` (NaN)
    never happens and such rows keep ``p = 0``, ``l = 0``. ``m_new`` itself stays ``-inf`` for them.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """``(acc / l, m + log2(l))`` after the last :func:`online_softmax_step`: the normalised output ``[rows, D]``
    and the base-2 log-sum-exp ``[rows]``. Rows that saw no key (``l == 0``, hence ``m == -inf``) give 0 and
    ``-inf``."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    return acc / l_safe[:, None], m_i + tl.log2(l_safe)


@triton.jit
def scores_grad(p, dp, delta, t, SOFTCAP: tl.constexpr):
    """``dL/dx`` for the logits ``s = f(x)``, ``x = scale * qk``: ``p * (dp - delta)`` (softmax) times ``f'(x) = 1 -
    t^2`` with softcap (``t`` from :func:`scores`). ``delta`` = ``rowsum(P * dP)``, broadcast against ``p`` by the
    caller."""
    ds = p * (dp - delta)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds
