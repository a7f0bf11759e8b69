"""Input checks at the public boundary, and the ``HF_ATTN_PLUGIN_CHECKS`` switch (pure torch, no Triton).

``HF_ATTN_PLUGIN_CHECKS`` (read at every call, so tests may flip it):

* ``0``: no value checks. Shape, dtype and device checks stay (they read only metadata: free).
  Out-of-range indices then reach the kernels: illegal memory accesses on a GPU.
* ``1`` (default): value checks of user-supplied index tensors that cost no synchronisation:
  device-side asserts (``torch._assert_async``: on a GPU a failure surfaces at the next synchronisation
  as "CUDA error: device-side assert triggered", which ends the CUDA context; rerun with ``full`` to see
  which check failed), or one host check where the call synchronises anyway (CPU tensors, or a length
  the caller left for us to read back): ``ValueError`` with the message. Index tensors the package built itself
  (:func:`mark_built`) are not re-checked.
* ``full``: every value check, with one host read-back (a synchronisation) per call, on package-built
  tensors too, raising ``ValueError`` with the message.
"""

from __future__ import annotations

import numbers
import os
from typing import Sequence

import torch

__all__ = ["OFF", "CHEAP", "FULL", "ENV", "checks_level", "require", "mark_built", "built_facts", "integer"]

ENV = "HF_ATTN_PLUGIN_CHECKS"
OFF, CHEAP, FULL = 0, 1, 2
_LEVELS = {"0": OFF, "1": CHEAP, "full": FULL}


def checks_level() -> int:
    """``OFF``, ``CHEAP`` or ``FULL`` from ``HF_ATTN_PLUGIN_CHECKS`` (unset or empty: ``CHEAP``)."""
    value = os.environ.get(ENV, "").strip().lower() or "1"
    try:
        return _LEVELS[value]
    except KeyError:
        raise ValueError(f"{ENV}={value!r}: expected 0 (off), 1 (cheap, the default) or full") from None


def integer(name: str, value, minimum: int = 0) -> int:
    """A host integer argument ``>= minimum`` (``window``, ``max_seqlen_q``, ``num_splits``, ...): ``ValueError`` for
    anything else, bools and floats included (``2.7`` must not become ``2``, and ``4.0`` is refused alike so that
    every entry point answers the same)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def require(conditions: Sequence[tuple[torch.Tensor, str]], *, host: bool) -> None:
    """Every element of each boolean tensor must be true, else fail with its message.

    ``host=True``: one read-back for all conditions (a synchronisation), ``ValueError`` on failure.
    ``host=False``: device-side asserts, no synchronisation (on a GPU a failure surfaces later as a
    CUDA device-side assert carrying the message; on CPU tensors ``RuntimeError`` at once). Under
    ``torch.compile`` the device-side form is used whatever ``host`` says (it traces).
    """
    if not conditions:
        return
    if host and not torch.compiler.is_compiling():
        oks = torch.stack([cond.all().to(conditions[0][0].device) for cond, _ in conditions]).tolist()
        for ok, (_, message) in zip(oks, conditions):
            if not ok:
                raise ValueError(message)
        return
    for cond, message in conditions:
        torch._assert_async(cond.all(), message)


# --------------------------------------------------------------------------- package-built tensors
_TAG = "_hf_attn_plugin_built"


def mark_built(tensor: torch.Tensor, **facts) -> torch.Tensor:
    """Tag an index tensor the package built itself as valid, with host-side ``facts`` about its values
    (bounds the consumer compares with its other arguments, e.g. ``num_pages=``). Returns the tensor.

    The tag lapses when the tensor is modified in place (its version counter moves; inference tensors,
    which have none, keep it).
    """
    version = None if tensor.is_inference() else tensor._version
    setattr(tensor, _TAG, (version, facts))
    return tensor


def built_facts(tensor: torch.Tensor | None) -> dict | None:
    """The facts :func:`mark_built` recorded for ``tensor``, or ``None`` (not package-built, modified
    since, or traced by ``torch.compile``, where every tensor is checked)."""
    if tensor is None or torch.compiler.is_compiling():
        return None
    tag = getattr(tensor, _TAG, None)
    if tag is None:
        return None
    version, facts = tag
    if version is not None and version != tensor._version:
        return None
    return facts
