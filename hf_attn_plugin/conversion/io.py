"""Checkpoint files: finding shards, reading tensors lazily, and writing the output atomically.

Reading goes through ``safetensors.safe_open`` so a tensor is materialised only when asked for; writing goes
shard by shard, so at most one output shard (plus the tensor being converted) is in memory. The output is
built in a hidden temporary directory next to the destination and renamed into place only once every file
is written: an interrupted or failed conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import shutil
import socket
import stat
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
        return read_json(path, " (the model configuration)")


def read_json(path: Path, what: str = "") -> dict:
    """A JSON object from ``path``; a ConversionError saying which file and what is wrong otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConversionError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ConversionError(f"{path} is not UTF-8 text (is it the right file?)") from err
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object{what}, not a {type(data).__name__}")
    return data


def check_shard_name(shard: object, index_path: Path, weights_suffix: str) -> str:
    """A shard name from an index must be a plain file name inside the checkpoint directory.

    Anything else (absolute paths, ``..``, sub-directories) would make the converter read, and write its
    output under, paths outside the directories it was given.
    """
    plain = (
        isinstance(shard, str)
        and shard not in ("", ".", "..")
        and "/" not in shard
        and "\\" not in shard
        and "\0" not in shard
        and not os.path.isabs(shard)
        and Path(shard).name == shard
    )
    if not plain:
        raise ConversionError(
            f"{index_path}: shard name {shard!r} in weight_map is not a plain file name; shards must be files "
            "directly inside the checkpoint directory (no directories, '..' or absolute paths)"
        )
    if not shard.endswith(weights_suffix):
        raise ConversionError(f"{index_path}: shard name {shard!r} in weight_map does not end in {weights_suffix}")
    return shard


def open_checkpoint(root: Path, allow_bin: bool = False) -> Checkpoint:
    """Locate the weight files of ``root``; refuse pickled weights unless ``allow_bin``."""
    if not root.is_dir():
        raise ConversionError(f"source {root} is not a directory")
    for index_name, single, is_bin in ((SAFE_INDEX, SAFE_SINGLE, False), (BIN_INDEX, BIN_SINGLE, True)):
        if (root / index_name).is_file():
            index = read_json(root / index_name)
            raw_map = index.get("weight_map")
            if not isinstance(raw_map, dict) or not raw_map:
                raise ConversionError(f"{root / index_name} has no weight_map (an object of tensor name -> shard)")
            suffix = ".bin" if is_bin else ".safetensors"
            weight_map = {
                str(name): check_shard_name(shard, root / index_name, suffix) for name, shard in raw_map.items()
            }
            metadata = index.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise ConversionError(f"{root / index_name}: metadata must be a JSON object")
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
        checkpoint = Checkpoint(root, shards, weight_map, dict(metadata), is_bin, indexed)
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
    try:
        save_file({n: t.contiguous() for n, t in tensors.items()}, path, metadata=metadata)
    except SafetensorError as err:  # safetensors reports I/O failures (disk full, ...) as "... (os error N)"
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def write_index(path: Path, weight_map: dict[str, str], infos: Mapping[str, TensorInfo], metadata: dict) -> None:
    """``model.safetensors.index.json`` with sizes recomputed from the converted tensors."""
    metadata = dict(metadata)
    metadata["total_size"] = sum(infos[n].nbytes for n in weight_map)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(_numel(infos[n].shape) for n in weight_map)
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")


# The files besides weights and config.json that a converted checkpoint carries over, byte for byte: generation
# settings, every tokenizer file transformers reads, chat templates, and the model card and licence (the
# converted weights stay under the source's licence). Nothing else is copied: not other weight formats (a stale
# pytorch_model.bin beside the safetensors), not notes, not arbitrary folders, not links to things outside.
COPIED_FILES = frozenset({
    "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md",
})
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers' folder of named chat templates (*.jinja)


@dataclass
class CopyPlan:
    """Which non-weight entries of the source are copied, and which are left out (reported to the user)."""

    files: list[str]  # relative paths, each a regular file or a link to one
    skipped: list[str]


def plan_copies(src: Path, written: set[str]) -> CopyPlan:
    """Files of ``src`` to carry over: the allow-listed ones (links followed only to regular files).

    ``written`` are the names the converter writes itself (shards, index, config.json); they are not copied.
    Hugging Face cache snapshots, where every file is a relative link into ``../../blobs``, are copied as the
    files the links point to.
    """
    files, skipped = [], []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name in written:
            continue
        if name in COPIED_FILES and entry.is_file():
            files.append(name)
        elif name == CHAT_TEMPLATE_DIR and entry.is_dir() and not entry.is_symlink():
            templates = sorted(t for t in entry.iterdir() if t.suffix == ".jinja" and t.is_file())
            files += [f"{name}/{t.name}" for t in templates]
            skipped += [f"{name}/{t.name}" for t in sorted(entry.iterdir()) if t not in templates]
        else:
            skipped.append(name + ("/" if entry.is_dir() else ""))
    return CopyPlan(files, skipped)


def copy_files(src: Path, dst: Path, files: list[str]) -> None:
    """Copy the planned files' contents (never the links themselves); modes follow the umask."""
    for rel in files:
        (dst / rel).parent.mkdir(exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse destinations that would clobber the source or an existing directory, or cannot be written."""
    if dst.is_symlink():
        raise ConversionError(
            f"destination {dst} is a symbolic link (to {os.readlink(dst)}); give the real directory path instead"
        )
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
    parent = dst_r.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"cannot create {dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot create {dst}: no permission to write in {parent}")


# Work directories live beside the destination, named after it, this tool, the host and the process:
# ".<dst>.convert-to-gqa-tmp.<pid>@<host>" while the output is written, "...-old..." while an --overwrite swap
# removes the previous output. A run killed half-way leaves one behind; a later run for the same destination
# removes those of dead processes on this host.
_WORK_DIR = re.compile(r"\.(?P<dst>.+)\.convert-to-gqa-(?:tmp|old)\.(?P<pid>\d+)@(?P<host>.+)")


def _work_dir(dst: Path, kind: str) -> Path:
    return dst.parent / f".{dst.name}.convert-to-gqa-{kind}.{os.getpid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_work_dirs(dst: Path) -> list[str]:
    """Remove work directories of ``dst`` that killed runs on this host left behind; one message for each."""
    messages = []
    if not dst.parent.is_dir():
        return messages
    host = socket.gethostname()
    for entry in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.convert-to-gqa-*")):
        match = _WORK_DIR.fullmatch(entry.name)
        if match is None or match["dst"] != dst.name or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        if match["host"] != host or _alive(pid):
            messages.append(f"left {entry} alone: it belongs to a run that may still be going (pid {pid} on "
                            f"{match['host']}); remove it yourself if that run is gone")
            continue
        shutil.rmtree(entry)
        messages.append(f"removed {entry}, left behind by an interrupted run (pid {pid})")
    return messages


@contextlib.contextmanager
def atomic_directory(dst: Path) -> Iterator[Path]:
    """Yield a fresh work dir beside ``dst``; on success it replaces ``dst``, on any error it is deleted.

    The directory is made with ``os.mkdir`` so its mode follows the umask, and every file written into it is
    given the umask's file mode before the rename (safetensors creates files 0600 whatever the umask).
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_dir(dst, "tmp")
    if tmp.exists():  # our own pid, so a leftover of an earlier process that had it
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    try:
        yield tmp
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # 0o777 minus the umask, without execute bits
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(file_mode)
        if dst.exists():
            # Move the old directory aside first so the swap is two renames, never a missing destination
            # while a long rmtree runs.
            old = _work_dir(dst, "old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
