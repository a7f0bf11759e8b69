"""``convert_to_gqa``: plan a conversion from tensor headers, then stream it shard by shard.

Planning reads only safetensors headers (plus the k/v tensors of one layer at a time for similarity grouping),
so every input error is raised before anything is written. Writing converts each tensor independently from the
plan: an output tensor depends on its own source tensor and its layer's permutation, never on tensors of other
shards, which is what lets memory stay bounded by one shard.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from . import pooling
from .errors import ConversionError
from .evaluation import VerifyResult, input_second_moments, text_token_ids, verify_conversion
from .families import AttentionTensor, Family, HeadGeometry, family_for
from .grouping import LayerTensors, kv_permutation, layer_generator, similarity_groups_for_layer
from .io import (
    SAFE_INDEX,
    SUPPORTED_DTYPES,
    Checkpoint,
    TensorInfo,
    CopyPlan,
    atomic_directory,
    check_destination,
    copy_files,
    open_checkpoint,
    plan_copies,
    remove_stale_work_dirs,
    shard_reader,
    shard_tensor_infos,
    write_index,
    write_shard,
)

Grouping = Literal["adjacent", "similarity"]
GROUPINGS: tuple[str, ...] = ("adjacent", "similarity")
VERIFY_MAX_TOKENS = 256
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorChange:
    """One tensor the conversion rewrites (dry-run plan line)."""

    name: str
    role: str
    dtype: torch.dtype
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]

    @property
    def bytes_before(self) -> int:
        return TensorInfo(self.name, self.shape_before, self.dtype).nbytes

    @property
    def bytes_after(self) -> int:
        return TensorInfo(self.name, self.shape_after, self.dtype).nbytes


@dataclass
class ConversionReport:
    """What a conversion did (or, for a dry run, would do)."""

    src: Path
    dst: Path
    family: str
    geometry: HeadGeometry
    num_kv_heads: int
    method: str
    grouping: str
    shards: list[str]
    total_bytes_before: int
    changes: list[TensorChange]
    groups: dict[str, list[list[int]]] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)  # non-weight files carried over byte for byte
    skipped: list[str] = field(default_factory=list)  # entries of the source that are not part of a checkpoint
    dry_run: bool = False
    verify: VerifyResult | None = None

    @property
    def total_bytes_after(self) -> int:
        return self.total_bytes_before - sum(c.bytes_before - c.bytes_after for c in self.changes)

    def summary(self, tensors: bool = False) -> str:
        g = self.geometry
        lines = [
            f"{'plan' if self.dry_run else 'converted'}: {self.src} -> {self.dst}",
            f"family {self.family}: {g.num_heads} query heads, KV heads {g.num_kv_heads} -> {self.num_kv_heads}, "
            f"head_dim {g.head_dim}, method {self.method}, grouping {self.grouping}",
            f"{len(self.shards)} shard(s), {len(self.changes)} tensors rewritten, "
            f"{_gib(self.total_bytes_before)} -> {_gib(self.total_bytes_after)}",
        ]
        if tensors:
            lines += [
                f"  {c.name}: {list(c.shape_before)} -> {list(c.shape_after)} {str(c.dtype).removeprefix('torch.')} "
                f"({c.bytes_before:,} -> {c.bytes_after:,} bytes)"
                for c in self.changes
            ]
        lines += [f"  {layer}: KV head groups {groups}" for layer, groups in self.groups.items()]
        if self.copied:
            lines.append(f"{'copies' if self.dry_run else 'copied'} unchanged: {', '.join(self.copied)}")
        if self.skipped:
            lines.append(f"not copied (not part of a checkpoint): {', '.join(self.skipped)}")
        if self.verify is not None:
            lines.append(self.verify.summary())
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.3f} MiB"


@dataclass
class _Plan:
    """Everything the writing pass needs, computed up front."""

    checkpoint: Checkpoint
    config: dict
    family: Family
    geometry: HeadGeometry
    num_groups: int
    method: pooling.PoolMethod
    infos: dict[str, TensorInfo]
    attention: dict[str, AttentionTensor]  # tensor name -> its role
    kv_perms: dict[str, list[int] | None]  # attention module -> permutation of KV heads
    members: dict[str, torch.Tensor | None]  # attention module -> member kept per group (first/random)

    def rewrites(self, name: str) -> bool:
        """Whether the tensor changes: it holds KV heads that get pooled, or heads of a permuted layer."""
        entry = self.attention.get(name)
        if entry is None:
            return False
        pooled = self.num_groups < self.geometry.num_kv_heads and any(s.kind == "kv" for s in entry.segments)
        return pooled or (bool(entry.segments) and self.kv_perms.get(entry.layer) is not None)

    def convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not self.rewrites(name):
            return tensor
        entry = self.attention[name]
        return pooling.convert_segments(
            tensor,
            entry.segments,
            self.geometry,
            self.num_groups,
            self.method,
            kv_perm=self.kv_perms.get(entry.layer),
            members=self.members.get(entry.layer),
        )

    def output_info(self, name: str) -> TensorInfo:
        info = self.infos[name]
        if not self.rewrites(name):
            return info
        shape = pooling.converted_shape(info.shape, self.attention[name].segments, self.geometry, self.num_groups)
        return TensorInfo(name, shape, info.dtype)


def convert_to_gqa(
    src: str | Path,
    dst: str | Path,
    num_kv_heads: int,
    method: pooling.PoolMethod = "mean",
    grouping: Grouping = "adjacent",
    overwrite: bool = False,
    dry_run: bool = False,
    calibration_text: str | None = None,
    seed: int = 0,
    allow_bin: bool = False,
    verify: bool = False,
    verify_text: str | None = None,
    progress: bool = True,
) -> ConversionReport:
    """Convert a local Hugging Face checkpoint to grouped-query attention with ``num_kv_heads`` KV heads.

    Args:
        src: checkpoint directory (config.json + safetensors, single file or sharded).
        dst: output directory; created atomically (temp dir beside it, renamed when complete).
        num_kv_heads: new KV head count G; must divide both the query and the current KV head counts.
        method: ``mean`` (GQA paper), ``first`` or ``random`` (one member head per group; paper's ablations).
        grouping: ``adjacent`` pools heads [0..k), [k..2k), ...; ``similarity`` first permutes heads so that the
            pooled ones are the most alike (by weights, or by activations on ``calibration_text``).
        overwrite: replace an existing ``dst``.
        dry_run: validate and return the plan without writing anything.
        calibration_text: text for activation-based similarity (loads the whole model once).
        seed: seed for ``method="random"``.
        allow_bin: accept pickled ``pytorch_model*.bin`` weights (loaded with ``weights_only=True``); the output is
            always safetensors.
        verify: after writing, run both models with transformers and report logit difference and perplexity.
        verify_text: text for ``verify`` (default: a built-in sample).
        progress: show tqdm progress bars.

    Raises:
        ConversionError: any problem with the arguments, the input checkpoint or the destination (including
            I/O errors such as a full disk); nothing is written then. With ``verify``, the converted model is
            checked in the work directory before it is renamed into place, so a failing check writes nothing too.
    """
    src, dst = Path(src), Path(dst)
    if dst.name in ("", ".", ".."):  # "." or "..": name the directory, so its work directories get a name too
        dst = dst.resolve()
    if method not in pooling.POOL_METHODS:
        raise ConversionError(f"unknown method {method!r}; choose from {', '.join(pooling.POOL_METHODS)}")
    if grouping not in GROUPINGS:
        raise ConversionError(f"unknown grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
    if calibration_text is not None and grouping != "similarity":
        raise ConversionError("calibration text is only used with grouping='similarity'")
    if verify_text is not None and not verify:
        raise ConversionError("a verify text is only used with verify=True (--verify)")
    if verify and dry_run:
        raise ConversionError("verify needs a written output; a dry run writes nothing (drop one of the two)")
    try:
        check_destination(src, dst, overwrite=overwrite or dry_run)
        plan = _plan(src, num_kv_heads, method, grouping, calibration_text, seed, allow_bin, progress)
        # Everything --verify needs from the user is checked now, before anything is written.
        verify_ids = text_token_ids(src, verify_text, _vocab_size(plan.config), VERIFY_MAX_TOKENS) if verify else None
        copies = plan_copies(src, plan.checkpoint.weight_files | {"config.json"})
    except OSError as err:
        raise ConversionError(f"cannot read {_os_error_text(err)}") from err
    report = ConversionReport(
        src=src,
        dst=dst,
        family=plan.family.name,
        geometry=plan.geometry,
        num_kv_heads=num_kv_heads,
        method=method,
        grouping=grouping,
        shards=plan.checkpoint.shards,
        total_bytes_before=sum(i.nbytes for i in plan.infos.values()),
        changes=[_change(plan, name) for name in plan.attention if plan.rewrites(name)],
        groups=_groups_of(plan),
        copied=copies.files,
        skipped=copies.skipped,
        dry_run=dry_run,
    )
    if dry_run:
        return report
    try:
        for message in remove_stale_work_dirs(dst):
            log.warning(message)
        with atomic_directory(dst) as tmp:
            try:
                _write(plan, tmp, copies, progress)
            except OSError as err:  # raised inside so that atomic_directory removes the work directory
                raise _write_error(err, dst, report.total_bytes_after) from err
            if verify_ids is not None:  # checked before the rename: a failing check leaves nothing behind
                try:
                    report.verify = verify_conversion(src, tmp, verify_ids, progress)
                except OSError as err:
                    raise ConversionError(f"--verify failed: {err}; nothing was written") from err
    except OSError as err:  # creating the work directory or renaming it into place
        raise _write_error(err, dst, report.total_bytes_after) from err
    return report


def _write_error(err: OSError, dst: Path, size: int) -> ConversionError:
    if err.errno == errno.ENOSPC:
        return ConversionError(
            f"no space left on the device of {dst.parent} while writing the output (it needs about "
            f"{_gib(size)}); nothing was written: free some space or choose another destination"
        )
    return ConversionError(f"cannot write {dst}: {_os_error_text(err)}; nothing was written")


def _os_error_text(err: OSError) -> str:
    """``path: reason`` (or ``a -> b: reason``) for an OSError, without the errno clutter."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    reason = err.strerror or str(err)
    return f"{where}: {reason}" if where else reason


def _vocab_size(config: dict) -> int:
    vocab = config.get("vocab_size", 256)
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ConversionError(f"config.json: vocab_size must be a positive integer, got {vocab!r}")
    return vocab


def _plan(
    src: Path,
    num_groups: int,
    method: pooling.PoolMethod,
    grouping: Grouping,
    calibration_text: str | None,
    seed: int,
    allow_bin: bool,
    progress: bool = False,
) -> _Plan:
    checkpoint = open_checkpoint(src, allow_bin=allow_bin)
    config = checkpoint.read_config()
    if "quantization_config" in config:
        raise ConversionError("quantized checkpoints are not supported; convert the full-precision weights")
    family = family_for(config)
    geometry = HeadGeometry.from_config(family, config)
    pooling.check_num_groups(geometry, num_groups)

    per_shard = {shard: shard_tensor_infos(checkpoint, shard) for shard in checkpoint.shards}
    infos = {info.name: info for shard_infos in per_shard.values() for info in shard_infos}
    present = {(info.name, shard) for shard, shard_infos in per_shard.items() for info in shard_infos}
    if missing := [f"{n} ({s})" for n, s in checkpoint.weight_map.items() if (n, s) not in present]:
        raise ConversionError(f"tensors listed in the index are missing from their shard: {', '.join(missing[:5])}")
    attention = {name: entry for name in infos if (entry := family.classify(name)) is not None}
    if not attention:
        raise ConversionError(f"no attention tensors with the {family.name} naming were found in {src}")
    layers = _layers(attention)
    for name, entry in attention.items():
        _check_tensor(infos[name], entry, geometry)

    kv_perms: dict[str, list[int] | None] = {}
    if grouping == "similarity" and 1 < num_groups < geometry.num_kv_heads:  # else there is nothing to choose
        moments = _calibration_moments(src, family, layers, calibration_text, config)
        for layer, tensors in tqdm(layers.items(), desc="grouping heads", unit="layer", disable=not progress):
            groups = similarity_groups_for_layer(checkpoint, tensors, geometry, num_groups, moments.get(layer))
            kv_perms[layer] = kv_permutation(groups)
    group_size = geometry.num_kv_heads // num_groups
    members = {
        layer: pooling.group_members(method, num_groups, group_size, layer_generator(seed, i))
        for i, layer in enumerate(layers)
    }
    return _Plan(checkpoint, config, family, geometry, num_groups, method, infos, attention, kv_perms, members)


def _layers(attention: dict[str, AttentionTensor]) -> dict[str, LayerTensors]:
    """Attention tensors grouped by module, in checkpoint layer order."""
    layers: dict[str, LayerTensors] = {}
    for name, entry in attention.items():
        param = name.rsplit(".", 1)[1]
        layers.setdefault(entry.layer, LayerTensors()).names[(entry.role, param)] = name
    return dict(sorted(layers.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _check_tensor(info: TensorInfo, entry: AttentionTensor, geometry: HeadGeometry) -> None:
    if not entry.segments:
        return
    if info.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES))
        raise ConversionError(f"tensor {info.name} has unsupported dtype {info.dtype} (supported: {supported})")
    heads = {"q": geometry.num_heads, "kv": geometry.num_kv_heads}
    axis = entry.segments[0].axis
    expected = sum(heads[s.kind] for s in entry.segments) * geometry.head_dim
    if len(info.shape) <= axis or info.shape[axis] != expected:
        raise ConversionError(
            f"shape mismatch: {info.name} has shape {list(info.shape)}, but config.json "
            f"({geometry.num_heads} heads, {geometry.num_kv_heads} KV heads, head_dim {geometry.head_dim}) "
            f"implies {expected} along dim {axis}"
        )


def _calibration_moments(
    src: Path, family: Family, layers: dict[str, LayerTensors], text: str | None, config: dict
) -> dict[str, torch.Tensor]:
    """Per attention module, the input second moment of its k (or fused qkv) projection; empty without text."""
    if text is None:
        return {}
    modules = {f"{layer}.{family.kv_projection}": layer for layer in layers}
    moments = input_second_moments(src, modules, text, _vocab_size(config))
    return {modules[name]: moment for name, moment in moments.items()}


def _change(plan: _Plan, name: str) -> TensorChange:
    before, after = plan.infos[name], plan.output_info(name)
    return TensorChange(name, plan.attention[name].role, before.dtype, before.shape, after.shape)


def _groups_of(plan: _Plan) -> dict[str, list[list[int]]]:
    """KV head groups per layer that differ from adjacent grouping (for the report)."""
    size = plan.geometry.num_kv_heads // plan.num_groups
    return {
        layer: [perm[i : i + size] for i in range(0, len(perm), size)]
        for layer, perm in plan.kv_perms.items()
        if perm is not None
    }


def _write(plan: _Plan, out: Path, copies: CopyPlan, progress: bool) -> None:
    """Write the converted checkpoint into the (empty) work directory ``out``."""
    checkpoint = plan.checkpoint
    names_by_shard: dict[str, list[str]] = {}
    for name, shard in checkpoint.weight_map.items():
        names_by_shard.setdefault(shard, []).append(name)
    out_map = {name: checkpoint.output_shard_name(shard) for name, shard in checkpoint.weight_map.items()}

    for shard in tqdm(checkpoint.shards, desc="converting shards", unit="shard", disable=not progress):
        with shard_reader(checkpoint, shard) as reader:
            tensors = {
                name: plan.convert(name, reader[name])
                for name in tqdm(names_by_shard[shard], desc=shard, unit="tensor", leave=False, disable=not progress)
            }
            write_shard(out / checkpoint.output_shard_name(shard), tensors, reader.metadata)
        del tensors  # free this output shard before the next one is built
    if checkpoint.indexed:
        infos = {name: plan.output_info(name) for name in out_map}
        write_index(out / SAFE_INDEX, out_map, infos, checkpoint.index_metadata)
    copy_files(checkpoint.root, out, copies.files)
    config = dict(plan.config)
    config[plan.family.kv_heads_key] = plan.num_groups
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
