"""Checkpoint files: finding shards, reading tensors lazily, and writing the output atomically.

Reading goes through ``safetensors.safe_open`` so a tensor is materialised only when asked for; writing goes
shard by shard, so at most one output shard (plus the tensor being converted) is in memory. The output is
built in a hidden temporary directory next to the destination and renamed into place only once every file
is written: an interrupted or failed conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SUPPORTED_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class Checkpoint:
    """A local checkpoint directory: its shards (in order), which shard holds each tensor, and its format."""

    root: Path
    shards: list[str]
    weight_map: dict[str, str]
    index_metadata: dict[str, object]
    is_bin: bool
    indexed: bool  # the source had an index json, so the output gets one too

    @property
    def weight_files(self) -> set[str]:
        """Files the converter rewrites rather than copies."""
        names = set(self.shards)
        names.add(BIN_INDEX if self.is_bin else SAFE_INDEX)
        return names

    def output_shard_name(self, shard: str) -> str:
        """Output file for an input shard: the same name, except pickles become safetensors."""
        if not self.is_bin:
            return shard
        return shard.replace("pytorch_model", "model", 1).removesuffix(".bin") + ".safetensors"

    def read_config(self) -> dict:
        path = self.root / "config.json"
        if not path.is_file():
            raise ConversionError(f"{self.root} has no config.json")
        return read_json(path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err


def open_checkpoint(root: Path, allow_bin: bool = False) -> Checkpoint:
    """Locate the weight files of ``root``; refuse pickled weights unless ``allow_bin``."""
    if not root.is_dir():
        raise ConversionError(f"source {root} is not a directory")
    for index_name, single, is_bin in ((SAFE_INDEX, SAFE_SINGLE, False), (BIN_INDEX, BIN_SINGLE, True)):
        if (root / index_name).is_file():
            index = read_json(root / index_name)
            if not isinstance(index.get("weight_map"), dict):
                raise ConversionError(f"{root / index_name} has no weight_map")
            weight_map = dict(index["weight_map"])
            metadata = dict(index.get("metadata", {}))
        elif (root / single).is_file():
            weight_map, metadata = {}, {}
        else:
            continue
        if is_bin and not allow_bin:
            raise ConversionError(
                f"{root} holds pickled .bin weights; pass --allow-bin (allow_bin=True) to load them with "
                "torch.load(weights_only=True), or convert them to safetensors first"
            )
        indexed = bool(weight_map)
        shards = sorted(set(weight_map.values())) if indexed else [single]
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ConversionError(f"missing shard file(s) listed in {index_name}: {', '.join(missing)}")
        checkpoint = Checkpoint(root, shards, weight_map, metadata, is_bin, indexed)
        if not indexed:
            checkpoint.weight_map = {info.name: single for info in shard_tensor_infos(checkpoint, single)}
        return checkpoint
    raise ConversionError(f"{root} has no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as err:  # weights_only refusals and corrupt archives
        raise ConversionError(f"cannot load {path} with weights_only=True: {err}") from err


def shard_tensor_infos(checkpoint: Checkpoint, shard: str) -> list[TensorInfo]:
    """Names, shapes and dtypes of a shard's tensors, without reading their data (pickles excepted)."""
    path = checkpoint.root / shard
    if checkpoint.is_bin:
        return [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in _load_bin(path).items()]
    infos = []
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                infos.append(TensorInfo(name, shape, _dtype_of(f, name, shape)))
    except SafetensorError as err:
        raise ConversionError(f"{path} is not a readable safetensors file: {err}") from err
    return infos


def _dtype_of(handle, name: str, shape: tuple[int, ...]) -> torch.dtype:
    """A tensor's dtype from an empty slice, which reads no data (scalars are tiny and read whole)."""
    if not shape:
        return handle.get_tensor(name).dtype
    return handle.get_slice(name)[0:0].dtype


class ShardReader(Protocol):
    metadata: dict[str, str]

    def __getitem__(self, name: str) -> torch.Tensor: ...


@contextlib.contextmanager
def shard_reader(checkpoint: Checkpoint, shard: str) -> Iterator[ShardReader]:
    """A mapping-like reader over one shard: ``reader[name]`` loads one tensor, ``reader.metadata`` the header."""
    path = checkpoint.root / shard
    if checkpoint.is_bin:
        yield _BinReader(_load_bin(path))
        return
    with safe_open(path, framework="pt") as f:
        yield _SafeReader(f)


class _SafeReader:
    def __init__(self, handle) -> None:
        self._handle = handle
        self.metadata = handle.metadata() or {"format": "pt"}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)


class _BinReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self.metadata = {"format": "pt"}

    def __getitem__(self, name: str) -> torch.Tensor:
        # Tied weights share storage in pickles; safetensors refuses shared tensors, so each gets its own.
        return self._tensors[name].clone()


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One tensor by name, opening only the shard that holds it (used by the grouping pass)."""
    with shard_reader(checkpoint, checkpoint.weight_map[name]) as reader:
        return reader[name]


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({n: t.contiguous() for n, t in tensors.items()}, path, metadata=metadata)


def write_index(path: Path, weight_map: dict[str, str], infos: Mapping[str, TensorInfo], metadata: dict) -> None:
    """``model.safetensors.index.json`` with sizes recomputed from the converted tensors."""
    metadata = dict(metadata)
    metadata["total_size"] = sum(infos[n].nbytes for n in weight_map)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(_numel(infos[n].shape) for n in weight_map)
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")


def copy_other_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy every non-weight file and folder of ``src`` byte for byte (tokenizer, generation config, ...)."""
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.name in skip:
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, dst / entry.name)
        copied.append(entry.name)
    return copied


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse destinations that would clobber the source or an existing directory."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if src_r == dst_r:
        raise ConversionError("destination is the source directory; write the converted checkpoint elsewhere")
    if src_r in dst_r.parents:
        raise ConversionError(f"destination {dst} is inside the source directory {src}")
    if dst_r in src_r.parents:
        raise ConversionError(f"destination {dst} contains the source directory {src}")
    if dst.exists() and not overwrite:
        raise ConversionError(f"destination {dst} exists; pass --overwrite (overwrite=True) to replace it")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(dst: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``dst``; on success it replaces ``dst``, on any error it is deleted."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            # Move the old directory aside first so the swap is two renames, never a missing destination
            # while a long rmtree runs.
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
