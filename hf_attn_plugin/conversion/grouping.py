"""Choosing which KV heads each new head pools: adjacent (the paper) or by similarity.

The similarity pass reads only the k/v tensors of one layer at a time, so it keeps the converter's memory
bound; calibration statistics (optional) need one forward pass of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import pooling
from .errors import ConversionError
from .families import HeadGeometry
from .io import Checkpoint, read_tensor


@dataclass
class LayerTensors:
    """Checkpoint tensor names of one attention block, keyed by (role, param), e.g. ("k", "bias")."""

    names: dict[tuple[str, str], str] = field(default_factory=dict)

    def get(self, role: str, param: str) -> str | None:
        return self.names.get((role, param))


def _kv_parts(
    checkpoint: Checkpoint, layer: LayerTensors, geometry: HeadGeometry, param: str
) -> dict[str, torch.Tensor] | None:
    """The k and v projection ``param`` (weight or bias) of a layer, split out of a fused qkv if needed."""
    if (name := layer.get("qkv", param)) is not None:
        q_size = geometry.num_heads * geometry.head_dim
        kv_size = geometry.num_kv_heads * geometry.head_dim
        _, k, v = read_tensor(checkpoint, name).split([q_size, kv_size, kv_size])
        return {"k": k, "v": v}
    names = {role: layer.get(role, param) for role in ("k", "v")}
    if any(n is None for n in names.values()):
        return None
    return {role: read_tensor(checkpoint, n) for role, n in names.items()}


def similarity_groups_for_layer(
    checkpoint: Checkpoint,
    layer: LayerTensors,
    geometry: HeadGeometry,
    num_groups: int,
    input_moment: torch.Tensor | None = None,
) -> list[list[int]]:
    """Equal-sized groups of this layer's KV heads whose k and v maps are closest to each other."""
    weights = _kv_parts(checkpoint, layer, geometry, "weight")
    if weights is None:
        raise ConversionError("similarity grouping: a layer lacks its k/v projection weights")
    biases = _kv_parts(checkpoint, layer, geometry, "bias") or {}
    sqrt_moment = None if input_moment is None else pooling.sqrt_second_moment(input_moment)
    features = [
        pooling.head_features(weights[role], biases.get(role), geometry.head_dim, sqrt_moment) for role in ("k", "v")
    ]
    return pooling.similarity_groups(pooling.pairwise_cost(features), num_groups)


def kv_permutation(groups: list[list[int]]) -> list[int] | None:
    """Head order that makes each group contiguous (None when it is the identity)."""
    perm = [head for group in groups for head in group]
    return None if perm == sorted(perm) else perm


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """A generator per layer so ``--method random`` does not depend on shard or processing order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_index)

