"""The family table: everything model-specific the converter knows, in one place.

Each entry says where a family keeps its head counts in ``config.json`` and how its attention tensors are
named and laid out. The rest of the package is family-agnostic: it only sees :class:`Segment` lists that
say which rows (or columns) of a tensor belong to query heads and which to key/value heads.

Adding a family is adding a row to :data:`FAMILIES`; nothing else should need to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Mapping

from .errors import ConversionError

HeadKind = Literal["q", "kv"]


@dataclass(frozen=True)
class Segment:
    """A head-major slice of a tensor along ``axis``: ``num_heads`` blocks of ``head_dim`` rows/columns.

    ``kind`` decides what happens to it: query heads are only permuted (similarity grouping), key/value heads
    are permuted and then pooled into the new number of KV heads.
    """

    kind: HeadKind
    axis: int


@dataclass(frozen=True)
class AttentionTensor:
    """What the converter must know about one checkpoint tensor of an attention block."""

    layer: str  # the attention module's name, e.g. "model.layers.3.self_attn"
    role: str  # "q", "k", "v", "o", "qkv", "q_norm", "k_norm"
    segments: tuple[Segment, ...]  # concatenated along their axis in this order; empty = copied unchanged


@dataclass(frozen=True)
class Family:
    """One model family: config keys and the tensor layout of its attention blocks.

    ``projections`` maps a role to the module name under the attention block. ``q``/``k``/``v`` project
    hidden -> heads (rows are head-major), ``o`` projects heads -> hidden (input columns are head-major) and
    ``qkv`` is a fused [q; k; v] projection (Phi-3). ``head_norms`` maps ``q_norm``/``k_norm`` to how the
    norm spans heads: ``"head_dim"`` (one vector shared by all heads: untouched) or ``"all_heads"`` (one
    weight per row of the projection, OLMo-2: permuted/pooled like that projection's rows).
    """

    name: str
    model_types: tuple[str, ...]
    projections: Mapping[str, str] = field(
        default_factory=lambda: {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    )
    head_norms: Mapping[str, Literal["head_dim", "all_heads"]] = field(default_factory=dict)
    attention_module: str = r".*\.layers\.\d+\.self_attn"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    head_dim_key: str = "head_dim"
    hidden_key: str = "hidden_size"

    @property
    def kv_projection(self) -> str:
        """The module whose input feeds the key/value heads (used for calibration statistics)."""
        return self.projections.get("k", self.projections.get("qkv", ""))

    def segments_for(self, role: str) -> tuple[Segment, ...]:
        """Head-major segments of a tensor with this role (empty: the tensor does not depend on heads)."""
        if role in ("q", "k", "v"):
            return (Segment("q" if role == "q" else "kv", axis=0),)
        if role == "o":
            return (Segment("q", axis=1),)
        if role == "qkv":
            return (Segment("q", 0), Segment("kv", 0), Segment("kv", 0))
        if self.head_norms.get(role) == "all_heads":
            return (Segment("q" if role == "q_norm" else "kv", axis=0),)
        return ()

    def classify(self, tensor_name: str) -> AttentionTensor | None:
        """Map a checkpoint tensor name to its attention role, or None for tensors that are copied as-is."""
        match = self._pattern.fullmatch(tensor_name)
        if match is None:
            return None
        role = self._role_by_module[match["module"]]
        segments = self.segments_for(role)
        # Output-projection biases live in hidden space, not head space.
        if role == "o" and match["param"] == "bias":
            segments = ()
        return AttentionTensor(layer=match["layer"], role=role, segments=segments)

    @cached_property
    def _role_by_module(self) -> dict[str, str]:
        roles = {module: role for role, module in self.projections.items()}
        roles.update({role: role for role in self.head_norms})
        return roles

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        modules = "|".join(re.escape(m) for m in self._role_by_module)
        return re.compile(rf"(?P<layer>{self.attention_module})\.(?P<module>{modules})\.(?P<param>weight|bias)")


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),  # optional attention biases are pooled like the weights
    Family("mistral", ("mistral",)),
    Family("mixtral", ("mixtral",)),  # experts are untouched
    Family("qwen2", ("qwen2",)),  # q/k/v biases
    Family("qwen3", ("qwen3",), head_norms={"q_norm": "head_dim", "k_norm": "head_dim"}),
    Family("gemma", ("gemma",)),  # explicit head_dim (256 != hidden / heads)
    Family("gemma2", ("gemma2",)),
    Family("gemma3", ("gemma3_text",), head_norms={"q_norm": "head_dim", "k_norm": "head_dim"}),
    Family("phi3", ("phi3",), projections={"qkv": "qkv_proj", "o": "o_proj"}),  # fused [q; k; v] rows
    Family("olmo2", ("olmo2",), head_norms={"q_norm": "all_heads", "k_norm": "all_heads"}),
)


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(config: Mapping[str, object]) -> Family:
    """The table entry for a parsed ``config.json``; a ConversionError listing the supported types if none."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConversionError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


@dataclass(frozen=True)
class HeadGeometry:
    """Head counts and sizes read from a config through a family's keys."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, family: Family, config: Mapping[str, object]) -> "HeadGeometry":
        num_heads = _positive_int(config, family.heads_key, family, required=True)
        hidden = _positive_int(config, family.hidden_key, family, required=True)
        # Absent or null kv heads means plain multi-head attention; absent or null head_dim means hidden/heads.
        num_kv_heads = _positive_int(config, family.kv_heads_key, family) or num_heads
        head_dim = _positive_int(config, family.head_dim_key, family) or hidden // num_heads
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


def _positive_int(config: Mapping[str, object], key: str, family: Family, required: bool = False) -> int | None:
    """``config[key]`` as a positive int; None when absent or null (unless required)."""
    value = config.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise ConversionError(f"config.json has no {key!r} (needed for a {family.name} model)")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    return value
