"""The parameters of one attention call, normalised once (pure Python + torch: no Triton, importable anywhere).

:class:`AttentionParams` holds everything about a call except the q/k/v tensors themselves: the integration builds it
from transformers' kwargs (:func:`hf_attn_plugin.integration.describe_call`), :func:`hf_attn_plugin.ops.attention` from
its keywords (after validating them); the kernels' Python launchers, the reference and the ops' helpers take it as
``(q, k, v, params)``. Only the ``torch.library`` op schemas list the fields one by one (schema types).

Conventions (what :meth:`AttentionParams.create` turns every "off" spelling into): ``window`` 0 and ``softcap`` 0.0
mean none; ``max_seqlen_q``/``max_seqlen_k`` 0 mean the padded lengths (:meth:`AttentionParams.max_seqlens`);
``dropout_p`` 0.0 means no dropout; ``seed`` is the dropout seed (an int64 tensor on the device; ``None`` until the
op draws one).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["AttentionParams"]


@dataclasses.dataclass(frozen=True)
class AttentionParams:
    """One attention call's parameters, normalised (see the module doc). Build it with :meth:`create`; the plain
    constructor is for values already normalised (the op bodies, the paged and decode paths: they pass the first
    fields positionally, so keep the field order)."""

    scale: float
    causal: bool = True
    window: int = 0  # keys a query sees, its own included; 0: no window
    softcap: float = 0.0  # 0.0: no softcap
    sinks: Optional[torch.Tensor] = None  # [Hq] logits
    segments: Optional[torch.Tensor] = None  # int32 [N, 5], see hf_attn_plugin.reference
    max_seqlen_q: int = 0  # longest query segment; 0: the padded length Sq
    max_seqlen_k: int = 0  # longest key segment; 0: the padded length Sk
    dropout_p: float = 0.0
    seed: Optional[torch.Tensor] = None  # int64 dropout seed on the device (hf_attn_plugin.ops.dropout_seed)

    @classmethod
    def create(
        cls,
        head_dim: int,
        *,
        scale: float | None = None,
        causal: bool = True,
        window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        dropout_p: float | None = 0.0,
        seed: torch.Tensor | None = None,
    ) -> "AttentionParams":
        """The one normalisation: ``scale`` ``None`` -> ``head_dim ** -0.5``; ``window``/``softcap`` ``None`` or
        ``<= 0`` -> 0 (none); ``max_seqlen_q/k`` ``None`` -> 0 (the padded lengths); ``dropout_p`` ``None`` -> 0.0;
        Python scalars cast to ``float``/``bool``/``int``. It does not validate: :func:`hf_attn_plugin.ops.attention`
        checks user values before calling it; the integration builds valid ones."""
        return cls(
            scale=float(head_dim**-0.5 if scale is None else scale),
            causal=bool(causal),
            window=int(window) if window and window > 0 else 0,
            softcap=float(softcap) if softcap and softcap > 0 else 0.0,
            sinks=sinks,
            segments=segments,
            max_seqlen_q=int(max_seqlen_q or 0),
            max_seqlen_k=int(max_seqlen_k or 0),
            dropout_p=float(dropout_p or 0.0),
            seed=seed,
        )

    @classmethod
    def resolve(cls, params: "AttentionParams | None", head_dim: int, options: dict) -> "AttentionParams":
        """``params``, or, when it is ``None``, :meth:`create` from keyword ``options`` (for functions that take
        either ``params`` or the keyword form). Both at once is a ``TypeError``."""
        if params is None:
            return cls.create(head_dim, **options)
        if options:
            raise TypeError(f"pass either params or its keywords ({', '.join(sorted(options))}), not both")
        if not isinstance(params, cls):
            raise TypeError(f"params must be an {cls.__name__} (see {cls.__name__}.create), got "
                            f"{type(params).__name__}")
        return params

    def max_seqlens(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
        """``(max_seqlen_q, max_seqlen_k)`` for padded lengths ``seqlen_q``/``seqlen_k`` (0 reads as them)."""
        return self.max_seqlen_q or seqlen_q, self.max_seqlen_k or seqlen_k

    @property
    def features(self) -> tuple[str, ...]:
        """The optional features this call uses, by name (a kernel that supports none of them checks ``not
        features``): ``segments``, ``window``, ``softcap``, ``sinks``, ``dropout``."""
        used = (("segments", self.segments is not None), ("window", self.window > 0), ("softcap", self.softcap > 0),
                ("sinks", self.sinks is not None), ("dropout", self.dropout_p > 0))
        return tuple(name for name, on in used if on)
