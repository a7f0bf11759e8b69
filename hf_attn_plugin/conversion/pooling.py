"""Pure tensor maths of the conversion: head permutations, pooling and similarity grouping.

Every tensor that depends on heads is described by :class:`~.families.Segment` s: head-major blocks of
``head_dim`` rows (or columns). Query segments are permuted, key/value segments are permuted and then pooled.
Nothing here touches files or transformers, so all of it is testable on small random tensors.

Why a permutation preserves the model: in GQA query head ``h`` reads KV head ``h // (H / H_kv)``. Reordering
KV heads by ``perm`` and moving each KV head's block of query heads along with it (q rows, q biases, per-head
q norms and the matching o_proj input columns) relabels heads without changing any sum, so the permuted model
computes the same function. Pooling afterwards merges *adjacent* KV heads, so the permutation chooses which
heads are merged.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from .errors import ConversionError
from .families import HeadGeometry, Segment

PoolMethod = Literal["mean", "first", "random"]
POOL_METHODS: tuple[str, ...] = ("mean", "first", "random")


def check_num_groups(geometry: HeadGeometry, num_groups: int) -> None:
    """Reject group counts that cannot give equal, contiguous groups of query and KV heads, or change nothing."""
    h, h_kv = geometry.num_heads, geometry.num_kv_heads
    choices = [g for g in range(1, h_kv) if h % g == 0 and h_kv % g == 0]
    hint = f"; choose one of {', '.join(map(str, choices))}" if choices else ""
    if num_groups < 1:
        raise ConversionError(f"--num-kv-heads must be >= 1, got {num_groups}{hint}")
    if num_groups == h_kv:
        raise ConversionError(
            f"the checkpoint already has {h_kv} KV heads, so --num-kv-heads {num_groups} would change nothing"
            f"{hint or ' (and it has no fewer that divide its heads)'}"
        )
    if num_groups > h_kv:
        raise ConversionError(
            f"--num-kv-heads {num_groups} is more than the checkpoint's {h_kv} KV heads "
            f"(the converter only merges heads){hint}"
        )
    if h % num_groups:
        raise ConversionError(f"--num-kv-heads {num_groups} does not divide the {h} attention heads{hint}")
    if h_kv % num_groups:
        raise ConversionError(f"--num-kv-heads {num_groups} does not divide the checkpoint's {h_kv} KV heads{hint}")


def query_permutation(kv_perm: Sequence[int], num_heads: int, num_kv_heads: int) -> list[int]:
    """Expand a KV-head permutation to the query heads: each KV head takes its block of query heads along."""
    per_kv = num_heads // num_kv_heads
    return [kv * per_kv + i for kv in kv_perm for i in range(per_kv)]


def permute_heads(x: torch.Tensor, perm: Sequence[int], head_dim: int, axis: int = 0) -> torch.Tensor:
    """Reorder the head blocks of ``x`` along ``axis``: block ``i`` of the result is block ``perm[i]``."""
    blocks = x.unflatten(axis, (len(perm), head_dim))
    return blocks.index_select(axis, torch.as_tensor(perm, device=x.device)).flatten(axis, axis + 1)


def pool_heads(
    x: torch.Tensor,
    num_groups: int,
    head_dim: int,
    method: PoolMethod = "mean",
    members: torch.Tensor | None = None,
    axis: int = 0,
) -> torch.Tensor:
    """Merge adjacent head blocks of ``x`` along ``axis`` into ``num_groups`` heads.

    ``mean`` averages each group (accumulated in at least fp32, then cast back so the dtype is kept);
    ``first`` and ``random`` keep one member per group: index ``members[g]`` within group ``g`` (zeros for
    ``first``; see :func:`group_members`).
    """
    num_heads = x.shape[axis] // head_dim
    grouped = x.unflatten(axis, (num_groups, num_heads // num_groups, head_dim)).movedim(axis, 0)
    if method == "mean":
        pooled = grouped.to(torch.promote_types(x.dtype, torch.float32)).mean(dim=1).to(x.dtype)
    elif members is not None:
        pooled = grouped[torch.arange(num_groups), members.to(x.device)]
    else:
        raise ValueError(f"method {method!r} needs members")
    return pooled.movedim(0, axis).flatten(axis, axis + 1).contiguous()


def group_members(
    method: PoolMethod, num_groups: int, group_size: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Which member of each group ``first``/``random`` keep (None for ``mean``).

    ``random`` picks one source head per group, the same one for every tensor of a layer (k, v, biases and
    norms stay consistent). The GQA paper's "random" baseline re-initialises K/V instead; picking a member
    is the stronger and reproducible variant of that ablation.
    """
    if method == "mean":
        return None
    if method == "first":
        return torch.zeros(num_groups, dtype=torch.long)
    return torch.randint(group_size, (num_groups,), generator=generator)


def convert_segments(
    x: torch.Tensor,
    segments: Sequence[Segment],
    geometry: HeadGeometry,
    num_groups: int,
    method: PoolMethod,
    kv_perm: Sequence[int] | None = None,
    members: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply permutation and pooling to each segment of ``x`` and re-concatenate (fused qkv: split, pool, fuse)."""
    if not segments:
        return x
    heads = {"q": geometry.num_heads, "kv": geometry.num_kv_heads}
    sizes = [heads[s.kind] * geometry.head_dim for s in segments]
    axis = segments[0].axis
    if x.shape[axis] != sum(sizes):
        raise ConversionError(
            f"expected {sum(sizes)} head rows along dim {axis}, found shape {tuple(x.shape)}"
        )
    q_perm = None if kv_perm is None else query_permutation(kv_perm, geometry.num_heads, geometry.num_kv_heads)
    parts = []
    for segment, part in zip(segments, x.split(sizes, dim=axis)):
        perm = q_perm if segment.kind == "q" else kv_perm
        if perm is not None:
            part = permute_heads(part, perm, geometry.head_dim, axis)
        if segment.kind == "kv" and num_groups != geometry.num_kv_heads:
            part = pool_heads(part, num_groups, geometry.head_dim, method, members, axis)
        parts.append(part)
    return torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]


def converted_shape(shape: Sequence[int], segments: Sequence[Segment], geometry: HeadGeometry, num_groups: int):
    """The shape :func:`convert_segments` will produce, computed without reading the tensor (dry runs)."""
    if not segments:
        return tuple(shape)
    removed = sum(geometry.num_kv_heads - num_groups for s in segments if s.kind == "kv") * geometry.head_dim
    out = list(shape)
    out[segments[0].axis] -= removed
    return tuple(out)


# --- similarity grouping -------------------------------------------------------------------------------


def head_features(
    weight: torch.Tensor, bias: torch.Tensor | None, head_dim: int, input_sqrt_moment: torch.Tensor | None = None
) -> torch.Tensor:
    """One row per head: the head's affine map ``[W_h | b_h]``, whitened by the input statistics if given.

    With ``input_sqrt_moment`` = L where L L^T = E[x~ x~^T] (x~ = [x, 1] the projection's input), the squared
    distance between two rows equals the mean squared difference of the two heads' activations on that input
    distribution, i.e. what mean-pooling them loses. Without it, inputs are taken as white (weights only).
    """
    w = weight.to(torch.float64)
    b = torch.zeros(w.shape[0], dtype=w.dtype) if bias is None else bias.to(torch.float64)
    affine = torch.cat([w, b[:, None]], dim=1)
    if input_sqrt_moment is not None:
        affine = affine @ input_sqrt_moment.to(torch.float64)
    return affine.unflatten(0, (-1, head_dim)).flatten(1)


def sqrt_second_moment(moment: torch.Tensor) -> torch.Tensor:
    """A factor L with L L^T = moment (ridge-regularised so rank-deficient calibration data still works)."""
    moment = moment.to(torch.float64)
    ridge = 1e-6 * moment.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(moment + ridge * torch.eye(moment.shape[0], dtype=moment.dtype))


def pairwise_cost(feature_sets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared distances between heads, summed over feature sets (k, v) each normalised to unit mean norm."""
    total = 0
    for features in feature_sets:
        scale = features.pow(2).sum(1).mean().clamp_min(1e-30)
        total = total + torch.cdist(features, features).pow(2) / scale
    return total


def similarity_groups(cost: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Partition heads into ``num_groups`` equal groups with small within-group pairwise cost.

    Starts from adjacent grouping and applies the best improving swap between two groups until none is left,
    so the result is never worse than adjacent grouping. Minimising the sum of within-group pairwise squared
    distances is the same as minimising the distance of members to their group mean, which is the error
    mean-pooling makes.
    """
    n = cost.shape[0]
    size = n // num_groups
    group_of = torch.arange(n) // size
    while True:
        # within[i, g]: cost of head i against all current members of group g.
        within = cost @ torch.nn.functional.one_hot(group_of, num_groups).to(cost.dtype)
        own = within.gather(1, group_of[:, None])
        # Swapping a (group A) with b (group B): a joins B minus b, b joins A minus a.
        cross_a = within[:, group_of]  # [a, b] = cost of a vs b's group
        gain = own + own.T - (cross_a - cost) - (cross_a.T - cost)
        gain[group_of[:, None] == group_of[None, :]] = 0
        best = int(gain.argmax())
        if gain.flatten()[best] <= 1e-12 * cost.abs().max():
            break
        a, b = divmod(best, n)
        group_of[a], group_of[b] = group_of[b].clone(), group_of[a].clone()
    groups = [sorted(torch.nonzero(group_of == g).flatten().tolist()) for g in range(num_groups)]
    return sorted(groups)


def grouping_cost(cost: torch.Tensor, groups: Sequence[Sequence[int]]) -> float:
    """Sum of within-group pairwise costs (each pair once): the quantity :func:`similarity_groups` lowers."""
    return float(sum(cost[g][:, g].sum() / 2 for g in map(list, groups)))
