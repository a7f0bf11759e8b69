"""Launch configurations of every kernel (flash forward/backward, paged attention): one lookup, no tuning stalls.

A launch config (:class:`Config`: tile rows/columns, warps, pipeline stages, warp specialization, split-K pieces
of the paged kernel) is chosen per :class:`Key`: kernel kind (``fwd``, ``bwd_dq``, ``bwd_dkdv``, ``paged_decode``,
``paged_prefill``), head-dim bucket (64/128/256: the candidate lists'), dtype class (fp16 and bf16 share one;
fp32 is its own), flags (causal; window, softcap, segments, sinks, dropout), power-of-two buckets of the query and
key lengths (128 to 32k) and the GQA ratio bucket (1/2/4/8). Short calls (``q_len <= 16``: decode, speculative
steps) have one query bucket and one key bucket whatever their context length, so a growing generation never
switches to a config that would need a new compile. :func:`pick` answers, in this order:

1. the process cache (each key is resolved once per process);
2. the user's persisted tuning results for the exact key (see *Opt-in tuning*);
3. the table shipped for this GPU architecture (``tuned/<arch>.json`` in this package, e.g. ``sm90`` for H100 and
   H200, loaded on first use): the exact key, else the nearest entry of the same kind, head-dim bucket, dtype
   class, causality and features, else the nearest plain entry (features map to the plain entries); "nearest"
   sums the log2 distances of the query-length, key-length and GQA buckets (ties: the shorter lengths, then the
   smaller group); short calls only borrow from short-call entries;
4. the candidate list's default (:func:`default_for`: its first entry; float32 at the 256 bucket, whose tiles need
   four-byte elements, a small single-stage tile).

A table names each config by value (``{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}``) with
the measurement behind it; ``benchmarks/tune_tables.py`` writes one on a GPU (the shipped ``sm90.json`` says in its
``source`` field whether it came from a tuning run or was seeded from the benchmark logs).

The flash forward has two kernels behind the one lookup: a config with ``gluon`` 0..3 names a variant of the Gluon
Hopper forward (``gluon_fwd.py``; candidates of the 64 and 128 buckets, after the Triton ones), so a table entry can
choose Gluon per key. ``flash.flash_attn_forward`` runs it where the Gluon kernel supports the call (16-bit, D 64 or
128, no segments/window/softcap/sinks/dropout, sm_90, Triton with Gluon); otherwise it asks :func:`pick` again with
``triton_only=True``: the table entry's recorded Triton ``fallback`` (nearest-bucket rules as above, over the
entries' Triton view), else the candidates' default. The dK/dV backward likewise (``Config.gluon`` of the
("bwd_dkdv", 64/128) lists: 0..2 of ``gluon_bwd.py``, same subset); dQ is always Triton.

No configuration is benchmarked at run time unless the user opts in, on any GPU: on a GPU without a shipped table
(or for a key the table lacks) the nearest entry or the default is used, and a fresh process pays compiles only.

Opt-in tuning (``HF_ATTN_PLUGIN_AUTOTUNE=1``): a key that neither the user's results nor the shipped table hold
exactly is benchmarked over its candidate list (``triton.testing.do_bench``) the first time it is seen; the winner
is saved under ``$XDG_CACHE_HOME/hf_attn_plugin`` (``~/.cache/hf_attn_plugin`` without it), one JSON file per GPU
name, Triton version and package version, and later processes use it without tuning (whether or not they opt in).
Never tuned, opt-in or not: short calls (``q_len <= 16``), calls made while a CUDA graph is being captured (they use
the lookup, uncached, so a later call outside the capture can tune), and the paged kernels (table or default).

Environment:

* ``HF_ATTN_PLUGIN_AUTOTUNE``: ``1`` tunes the keys the tables miss (above); ``0`` or unset (the default): never
  tunes. (Until this change tuning was on by default and ``0`` meant "always the first candidate".)
* ``HF_ATTN_PLUGIN_TUNE_CACHE=0``: neither read nor write persisted tuning results (``1``, the default: both).
* ``HF_ATTN_PLUGIN_GLUON=0``: never run the Gluon kernels (forward, dK/dV); where a config names one, the key's
  Triton config runs (as for calls the Gluon kernel does not support). ``1``, the default: Gluon where the config
  names it.
* ``HF_ATTN_PLUGIN_VERBOSE=1``: print each key's config and where it came from (user, exact, nearest, plain,
  default, tuned), and every tuned candidate's time, registers and spills.
* ``TRITON_INTERPRET=1`` (CPU tests): fixed small configs (tiles of 16/32 rows, so that the CPU tests cross many
  tile boundaries on short sequences); no table, no tuning.

We do not use ``@triton.autotune``: it fails under the Triton interpreter, it cannot run while a CUDA graph is
being captured, and its key would be the raw sequence length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["Config", "Key", "Table", "interpreting", "candidates", "pick", "lookup", "tune", "seq_bucket", "CACHE",
           "gpu_arch", "shipped_table", "user_cache_path", "dumps_table", "clear_cache", "TABLE_FORMAT",
           "GLUON_VARIANTS", "Unsupported", "triton_default", "launch_fitting"]

TABLE_FORMAT = 1
GLUON_VARIANTS = (0, 1, 2, 3)  # Config.gluon: the warp_spec variants of kernels/gluon_fwd.py
SHORT_Q = 16  # query lengths up to this share one bucket and are never tuned (decode, short calls)


@dataclass(frozen=True)
class Config:
    """``block_m``: query rows per tile; ``block_n``: key rows per tile (in every kernel).

    ``warp_spec`` (flash forward, dK/dV): Triton's warp specialization of the kernel's one loop; ``num_warps`` is
    then the size of each consumer warpgroup (Triton adds a producer warpgroup that issues the TMA loads and
    splits the stationary tile over two consumers).

    Paged attention: ``block_m`` rows are (query tokens x the GQA group's heads padded to a power of two), so a
    prefill program takes ``max(1, block_m // head_pad)`` tokens (decode: one token, the group's heads padded to
    16 rows). Split-K (paged only): ``min_split_keys`` is the shortest piece a sequence is cut into;
    ``split_programs`` the number of programs that fill the GPU (0: four per SM).

    ``two_pass`` (dK/dV only): dV and dK in two launches of the Triton kernel, one ``[BLOCK_N, D]`` fp32 accumulator
    each instead of both in one program (the scores are computed twice, 5 matmuls instead of 4). At D 256 two
    accumulators leave no room for Hopper's wgmma tiles (the one-pass configs that do not spill fall back to
    Ampere's ``mma.sync``); one accumulator does.

    ``gluon`` (flash forward and dK/dV): -1 (the default) runs the Triton kernel; 0..3 runs that variant
    (``warp_spec`` argument) of the Gluon Hopper forward, ``kernels/gluon_fwd.py`` (dK/dV: 0..2 of
    ``kernels/gluon_bwd.py``), whose tile shape is fixed: the other fields then only record it (``_config`` of the
    module). ``flash.flash_attn_forward`` / ``flash_attn_backward`` run a Gluon config only where the Gluon kernel
    supports the call, else the key's Triton config (:func:`pick` with ``triton_only``).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_spec: bool = False
    min_split_keys: int = field(default=1024, kw_only=True)
    split_programs: int = field(default=0, kw_only=True)
    gluon: int = field(default=-1, kw_only=True)
    two_pass: bool = field(default=False, kw_only=True)

    def __post_init__(self):
        if self.gluon not in GLUON_VARIANTS + (-1,):
            raise ValueError(f"gluon={self.gluon!r}: expected -1 (the Triton kernel) or a Gluon forward variant "
                             f"{GLUON_VARIANTS}")
        if self.gluon >= 0 and self.warp_spec:
            raise ValueError("a Gluon config has its own warp specialization (gluon=0..3): leave warp_spec False")
        if self.two_pass and self.gluon >= 0:
            raise ValueError("two_pass is a mode of the Triton dK/dV kernel: a Gluon config cannot have it")
        if self.warp_spec and self.num_stages > 2:
            # Triton 3.6 on the H200: warp-specialized forwards with 3 stages returned NaN / wrong LSE (128x64 at
            # D=128, 128x128 at D=64) while 1 and 2 stages matched the reference; never offered to the tuner.
            raise ValueError("warp-specialized configs are limited to num_stages <= 2 (miscompiled with more)")

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v}' for k, v in self.to_json().items())})"

    def to_json(self) -> dict:
        """The config by value; fields at their default are left out."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown launch-config fields {sorted(unknown)} (known: {sorted(names)})")
        return cls(**data)


_FEATURES = ("window", "softcap", "segmented", "sinks", "dropout")


@dataclass(frozen=True)
class Key:
    """What a launch config is chosen by (build one with :meth:`make`, which buckets the raw values)."""

    kind: str  # fwd, bwd_dq, bwd_dkdv, paged_decode, paged_prefill
    dim: int  # head-dim bucket of the candidate lists
    dtype: str  # "16bit" (fp16 and bf16 share configs) or "fp32"
    causal: bool
    seq_q: int  # query-length bucket (SHORT_Q for q_len <= 16)
    seq_k: int  # key-length bucket (SHORT_Q for every short call, whatever its context length)
    group: int = 1  # GQA ratio bucket: 1, 2, 4, 8
    window: bool = False
    softcap: bool = False
    segmented: bool = False
    sinks: bool = False
    dropout: bool = False

    @classmethod
    def make(cls, kind: str, block_d: int, *, dtype, causal: bool, seq_q: int, seq_k: int, group: int = 1,
             **features: bool) -> "Key":
        """Raw call values (``dtype`` a torch dtype or name, lengths and ``group`` as they are) -> bucketed key."""
        unknown = set(features) - set(_FEATURES)
        if unknown:
            raise TypeError(f"unknown launch-config key features {sorted(unknown)} (known: {', '.join(_FEATURES)})")
        short = seq_q <= SHORT_Q  # one key whatever the context length: no new config as a generation grows
        return cls(kind=kind, dim=_dim_bucket(block_d), dtype=_dtype_class(dtype), causal=bool(causal),
                   seq_q=q_bucket(seq_q), seq_k=SHORT_Q if short else seq_bucket(seq_k), group=group_bucket(group),
                   **{name: bool(value) for name, value in features.items()})

    @property
    def features(self) -> Tuple[str, ...]:
        return tuple(name for name in _FEATURES if getattr(self, name))

    def plain(self) -> "Key":
        return dataclasses.replace(self, **{name: False for name in _FEATURES})

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in ("kind", "dim", "dtype", "causal", "seq_q", "seq_k", "group")}
        out.update({name: True for name in self.features})
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "Key":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown key fields {sorted(unknown)} (known: {sorted(names)})")
        return cls(**data)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Interpreter: small tiles, block_m != block_n so that both alignments are exercised. Paged: 32 rows, 32-key
# tiles, short split-K pieces and few "programs that fill the GPU" so that the CPU tests split.
INTERPRET_SPLIT_PROGRAMS = 16
_INTERPRET = {
    "fwd": Config(32, 16, 4, 1),
    "bwd_dq": Config(32, 16, 4, 1),
    "bwd_dkdv": Config(16, 32, 4, 1),
    "bwd_pre": Config(32, 16, 4, 1),
    "paged_decode": Config(32, 32, 4, 1, min_split_keys=32, split_programs=INTERPRET_SPLIT_PROGRAMS),
    "paged_prefill": Config(32, 32, 4, 1, min_split_keys=32, split_programs=INTERPRET_SPLIT_PROGRAMS),
}

def _gluon_candidates(head_dim: int) -> Tuple[Config, ...]:
    """The Gluon forward's variants as configs (kernels/gluon_fwd.py ``_config``: 128x128 tiles; 3 stages at D=64,
    2 at D=128; the default partition's warps: both math warpgroups in 0/1, one in 2/3)."""
    stages = 3 if head_dim == 64 else 2
    return tuple(Config(128, 128, 8 if v < 2 else 4, stages, gluon=v) for v in GLUON_VARIANTS)


def _gluon_bwd_candidates(head_dim: int) -> Tuple[Config, ...]:
    """The Gluon dK/dV kernel's variants (kernels/gluon_bwd.py ``_config``: 128 keys x 64 query rows; 3 stages at
    D=64, 2 at D=128; 0: 8 math warps, 1: plus a producer warp, 2: two 4-warp math partitions plus a producer)."""
    stages = 3 if head_dim == 64 else 2
    return tuple(Config(64, 128, 8 if v < 2 else 4, stages, gluon=v) for v in (0, 1, 2))


# Hopper candidates, default first (used wherever no table entry applies, so it must fit every dtype). wgmma
# wants >= 64 rows per warpgroup; head_dim 128 at 128x128 tiles sits at the register limit, so the larger tiles
# are only tried where they can fit.
_GPU: Dict[Tuple[str, int], Sequence[Config]] = {
    # D=64 (session 5): the shapes most users run (Llama-3.2-1B, Qwen2.5-0.5B, SmolLM2, BERT) were at 0.4-0.5x
    # cuDNN with three candidates; the wider list below is for benchmarks/tune_tables.py to choose from.
    ("fwd", 64): (Config(128, 128, 8, 3), Config(128, 64, 4, 3), Config(128, 128, 4, 3), Config(128, 64, 8, 3),
                  Config(128, 64, 4, 4), Config(128, 128, 8, 4), Config(64, 64, 4, 3), Config(64, 128, 4, 3),
                  *_gluon_candidates(64)),
    # Forward: no 2-stage candidates without warp specialization: with TMA loads, ptxas (Triton 3.6's) crashes on
    # them (checked by compiling for sm_90 on a CPU machine; 1 and 3 stages compile). Warp-specialized candidates
    # (H200, session 4, same process): D=256 +23% (601 vs 490 TFLOP/s at S=8k), D=128 +13% at S=1k but -1..-4% at
    # 4k-16k (the tuner decides per bucket), D=64 -25% (none listed).
    # D=128: 128x128 tiles win every bf16 bucket from S=4k to 16k when tuned (H200, TMA forward, run 4: 4.36 vs
    # 4.63 ms at 16k), but the default (used where no table entry applies: fp32, CUDA-graph capture of an unseen
    # key) must fit every dtype: fp32 128x128 tiles need 393 KB of shared memory, 128x64 fit (230 KB).
    ("fwd", 128): (Config(128, 64, 8, 3), Config(128, 128, 8, 3), Config(128, 64, 4, 3), Config(128, 64, 8, 4),
                   Config(128, 32, 4, 4), Config(128, 128, 4, 2, True), Config(128, 128, 4, 1, True),
                   *_gluon_candidates(128)),
    # ^ Gluon forwards (sm_90, Triton 3.6; last, never the default): H200, one process, bf16
    #   (/work/.device/3/gluon_bench.log): ws3/ws2 +6..17% over ours at D=128 (S 2k-16k) and D=64 S=4k 32/8;
    #   -24..-33% at D=64 S=2k 9/3. Unsupported calls (features, fp32, D not 64/128, not sm_90) run Triton.
    # Small single-stage tiles for float32 inputs at head dims padded to 256 (160, 192, 256) are in the D=256 lists:
    # the H200 refused the default forward for them (294944 > 232448 bytes of shared memory). float32 keys start
    # from them (_FP32_DEFAULTS); launch_fitting walks the list to the first config that fits where one does not.
    ("fwd", 256): (Config(128, 32, 8, 3), Config(64, 32, 4, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 1),
                   Config(128, 64, 4, 1, True), Config(128, 64, 4, 2, True), Config(64, 32, 4, 1)),
    ("bwd_dq", 64): (Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(128, 128, 8, 2), Config(64, 128, 4, 2),
                     Config(128, 64, 8, 3), Config(128, 128, 8, 3)),
    ("bwd_dq", 128): (Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(64, 128, 8, 2), Config(128, 64, 8, 3),
                      Config(128, 32, 8, 3)),
    ("bwd_dq", 256): (Config(64, 64, 4, 1), Config(64, 32, 4, 2), Config(128, 32, 8, 1), Config(32, 32, 4, 1),
                      Config(32, 64, 4, 2), Config(64, 64, 8, 2)),
    ("bwd_dkdv", 64): (Config(64, 128, 8, 2), Config(32, 128, 4, 2), Config(64, 64, 4, 3), Config(64, 128, 4, 2, True),
                       Config(64, 128, 8, 3), Config(32, 64, 4, 3), Config(128, 128, 8, 2), Config(64, 64, 8, 3),
                       *_gluon_bwd_candidates(64)),
    # dK and dV accumulate in registers for the whole program: [BLOCK_N, D] fp32 each. At D=128 a
    # 128-row KV tile spills on 8 warps (114-214 spilled registers); 64-row KV tiles on 8 warps were
    # 2x slower still (likely: two warpgroups share a 64-row wgmma M dimension); one warpgroup on a
    # 64-row KV tile with 32-row query tiles was fastest (H200 run 2, MHA S=16k: 3.96 ms vs 5.62 ms
    # for the best run-1 config; see benchmarks/NOTES_flash.md).
    ("bwd_dkdv", 128): (Config(32, 64, 4, 3), Config(64, 128, 8, 2), Config(64, 64, 8, 3), Config(32, 64, 4, 4),
                        Config(16, 64, 4, 4), Config(64, 64, 4, 2), Config(32, 128, 8, 3), Config(64, 128, 4, 2, True),
                        *_gluon_bwd_candidates(128)),
    # ^ warp-specialized 64x128 (two 64-row consumers): ~2% faster where picked (session 4); WS 32x128 and 64x64
    #   were 10-50% slower at every shape and are not listed (benchmarks/results/flash_ws_bwd_variants_log.txt).
    #   Gluon dK/dV (kernels/gluon_bwd.py, D 64/128 buckets): last, never the default; not timed on a GPU yet.
    # (the untuned default ran D 256 at 0.25x cuDNN, B 8 S 2k: session 8 tunes the bucket with two more tile shapes)
    # Two-pass candidates (dV, then dK: one [BLOCK_N, 256] fp32 accumulator per program). Compiled for sm_90 on a CPU
    # machine (benchmarks/compile_flash.py, bf16, causal, S 4k): the one-pass tiles with 64 key rows spill (MHA
    # 332-3816 bytes, GQA 4 568-2980) and the one that does not (64x32, MHA) runs Ampere's mma.sync; the two-pass
    # tiles run wgmma m64n256k16 for dK/dV, spilling 0-108 bytes (MHA) or 0-428 (GQA 4) per pass. On the H200
    # (tune_tables, benchmarks/logs/tune_sm90_d256_dkdv_20261202.log) 32x128/8 warps/3 stages won every D 256 key, dK/dV
    # 1.9x faster than session 8's best one-pass tile (causal MHA S 4k: 2.98 vs 5.70 ms).
    ("bwd_dkdv", 256): (Config(64, 64, 8, 1), Config(32, 64, 8, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 1),
                        Config(32, 32, 8, 2), Config(16, 64, 4, 2), Config(32, 128, 8, 3, two_pass=True),
                        Config(32, 128, 8, 2, two_pass=True), Config(16, 128, 8, 2, two_pass=True),
                        Config(32, 64, 8, 2, two_pass=True)),
    ("bwd_pre", 64): (Config(128, 0, 4, 1),),
    ("bwd_pre", 128): (Config(128, 0, 4, 1),),
    ("bwd_pre", 256): (Config(64, 0, 4, 1),),
    # Paged attention (H200 sweeps, benchmarks/NOTES_paged.md). Decode streams K/V once: 64-key tiles, 4 warps,
    # 2 stages were best or within 1% everywhere (8 warps and 32-key tiles lost 10-25%; 128-key tiles equal at 2
    # stages). Prefill packs ~64 query rows (tokens x group heads) per program (32 at D=256); 128 rows, 128-key
    # tiles, 8 warps were 5% faster on 4 x 4096 new tokens after 4096 cached (306 vs 292 TFLOP/s).
    # Decode pieces as short as 128 keys (kernels/paged.py default_num_splits: B=1 fills the GPU).
    # D 64: 128-key tiles first since the decode route computes its pages (no table; benchmarks/NOTES_decode.md,
    # probe_decode_configs.py, two H200 runs): B=1 x 4k 7.2 vs 7.9 us, B=16 x 32k 262 vs 276 us, B=64 x 4k 131 vs
    # 138 us, B=1 x 32k equal. At D 128 the 64-key tile stayed best (B=16 x 4k 69 vs 78 us).
    ("paged_decode", 64): (Config(16, 128, 4, 2, min_split_keys=128), Config(16, 64, 4, 2, min_split_keys=128)),
    ("paged_decode", 128): (Config(16, 64, 4, 2, min_split_keys=128), Config(16, 128, 4, 2, min_split_keys=128)),
    ("paged_decode", 256): (Config(16, 64, 4, 2, min_split_keys=128), Config(16, 128, 4, 2, min_split_keys=128)),
    ("paged_prefill", 64): (Config(64, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 128, 4, 3)),
    # D 128 prefill: 128 rows x 128-key tiles, 8 warps first since block-table tiles multi-buffer K/V (the next tile's
    # pages loaded a tile ahead): 4 x 4096 new tokens after 4096 cached, 5.18 ms vs 6.46 ms for 64x64 (H200,
    # benchmarks/logs/paged_decode.log, 2026-12-02). Other buckets not re-measured.
    ("paged_prefill", 128): (Config(128, 128, 8, 3), Config(64, 64, 4, 3), Config(64, 128, 4, 3)),
    ("paged_prefill", 256): (Config(32, 64, 4, 3), Config(64, 64, 4, 3)),
}

# Process cache: (arch, Key) -> Config. _RAW memoises pick()'s keyword keys (bucketed) in front of it.
CACHE: Dict[tuple, Config] = {}
_RAW: Dict[tuple, Config] = {}


def _dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def triton_next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def seq_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length, clamped to [128, 32768]."""
    return min(max(triton_next_pow2(max(n, 1)), 128), 32768)


def q_bucket(n: int) -> int:
    """Query-length bucket: :data:`SHORT_Q` for ``n <= 16`` (decode, short calls), else :func:`seq_bucket`."""
    return SHORT_Q if n <= SHORT_Q else seq_bucket(n)


def group_bucket(group: int) -> int:
    """GQA ratio bucket: the next power of two, at most 8."""
    return min(triton_next_pow2(max(int(group), 1)), 8)


def _dtype_class(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name in ("float16", "bfloat16", "16bit"):
        return "16bit"
    if name in ("float32", "fp32"):
        return "fp32"
    return name


def candidates(kind: str, block_d: int) -> Sequence[Config]:
    if interpreting():
        return (_INTERPRET[kind],)
    return _GPU[(kind, _dim_bucket(block_d))]


# ----------------------------------------------------------------------------------------------- tables
class Table:
    """Configs by key, with the lookup order of the module docstring (exact, nearest bucket, plain features).

    ``fallbacks``: for an entry whose config is a Gluon forward, the best Triton config measured for the same key
    (JSON: the entry's ``"fallback"``); :meth:`lookup` with ``triton_only`` uses it for calls the Gluon kernel cannot
    run (features borrowing a plain entry, head dims 80/96 in the 128 bucket, another GPU)."""

    def __init__(self, entries: Mapping[Key, Config], meta: Optional[Mapping] = None,
                 fallbacks: Optional[Mapping[Key, Config]] = None):
        self.entries: Dict[Key, Config] = dict(entries)
        self.meta = dict(meta or {})
        self.fallbacks: Dict[Key, Config] = dict(fallbacks or {})
        for key, cfg in self.fallbacks.items():
            if cfg.gluon >= 0 or key not in self.entries or self.entries[key].gluon < 0:
                raise ValueError(f"fallback {cfg} for {key.to_json()}: a fallback must be a Triton config (gluon=-1) "
                                 f"of an entry whose config is a Gluon one")

    def __len__(self) -> int:
        return len(self.entries)

    def triton_view(self) -> Dict[Key, Config]:
        """The entries with Gluon configs replaced by their Triton fallbacks (left out where none is recorded)."""
        out = {}
        for key, cfg in self.entries.items():
            cfg = cfg if cfg.gluon < 0 else self.fallbacks.get(key)
            if cfg is not None:
                out[key] = cfg
        return out

    def lookup(self, key: Key, triton_only: bool = False) -> Optional[Tuple[Config, str]]:
        """``(config, "exact" | "nearest" | "plain")`` or None when no entry shares kind/dim/dtype/causal.
        ``triton_only``: the same lookup over :meth:`triton_view`."""
        entries = self.triton_view() if triton_only else self.entries
        hit = entries.get(key)
        if hit is not None:
            return hit, "exact"
        for probe, how in ((key, "nearest"), (key.plain(), "plain")):
            same = [k for k in entries if _same_family(k, probe)]
            if same:
                best = min(same, key=lambda k: (_distance(k, probe), k.seq_q, k.seq_k, k.group))
                return entries[best], how
        return None

    @classmethod
    def from_json(cls, data: Mapping, source: str = "<table>") -> "Table":
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"{source}: launch-config table format {data.get('format')!r}, expected "
                             f"{TABLE_FORMAT} (regenerate it with benchmarks/tune_tables.py)")
        entries, fallbacks = {}, {}
        for i, item in enumerate(data.get("entries", ())):
            try:
                key = Key.from_json(item["key"])
                entries[key] = Config.from_json(item["config"])
                if "fallback" in item:
                    fallbacks[key] = Config.from_json(item["fallback"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{source}: entry {i} is malformed ({exc}): {item}") from exc
        try:
            return cls(entries, {k: v for k, v in data.items() if k != "entries"}, fallbacks)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc

    def to_json(self, extra: Optional[Mapping[Key, Mapping]] = None) -> dict:
        """``{"format", meta..., "entries": [{"key", "config", ["fallback",] extra...}]}``, entries sorted for stable
        diffs."""
        extra = extra or {}
        rows = [dict(key=k.to_json(), config=c.to_json(),
                     **({"fallback": self.fallbacks[k].to_json()} if k in self.fallbacks else {}), **extra.get(k, {}))
                for k, c in sorted(self.entries.items(), key=lambda kv: _sort_key(kv[0]))]
        return dict({"format": TABLE_FORMAT}, **{k: v for k, v in self.meta.items() if k != "format"}, entries=rows)


def dumps_table(data: Mapping) -> str:
    """JSON text of :meth:`Table.to_json`'s output, one entry per line (readable diffs)."""
    head = json.dumps({k: v for k, v in data.items() if k != "entries"}, indent=1)
    rows = ",\n".join("  " + json.dumps(row) for row in data.get("entries", ()))
    return head[: -len("\n}")] + ',\n "entries": [\n' + rows + "\n ]\n}\n"


def _same_family(a: Key, b: Key) -> bool:
    """Entries a lookup may borrow from: short calls (decode) only from short-call entries."""
    return ((a.kind, a.dim, a.dtype, a.causal, a.features, a.seq_q == SHORT_Q)
            == (b.kind, b.dim, b.dtype, b.causal, b.features, b.seq_q == SHORT_Q))


def _distance(a: Key, b: Key) -> float:
    return (abs(math.log2(a.seq_q) - math.log2(b.seq_q)) + abs(math.log2(a.seq_k) - math.log2(b.seq_k))
            + abs(math.log2(a.group) - math.log2(b.group)))


def _sort_key(k: Key) -> tuple:
    return (k.kind, k.dim, k.dtype, not k.causal, k.features, k.group, k.seq_q, k.seq_k)


_TABLE_DIR = Path(__file__).with_name("tuned")


@functools.lru_cache(maxsize=None)
def shipped_table(arch: str) -> Table:
    """The table shipped for ``arch`` (``tuned/<arch>.json``), empty if there is none."""
    path = _TABLE_DIR / f"{arch}.json"
    if not path.is_file():
        return Table({})
    with open(path) as f:
        return Table.from_json(json.load(f), str(path))


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def _has_cuda() -> bool:
    return torch.cuda.is_available()


def gpu_arch() -> str:
    """``sm<major><minor>`` of the current CUDA device (``cpu`` without one)."""
    if not _has_cuda():
        return "cpu"
    return _device_arch(torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------- user results
def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip()
    if value == "":
        return default
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{name}={value!r}: expected 0 or 1 (see hf_attn_plugin/kernels/configs.py)")


def autotune_enabled() -> bool:
    return _env_flag("HF_ATTN_PLUGIN_AUTOTUNE", False)


def gluon_enabled() -> bool:
    """``HF_ATTN_PLUGIN_GLUON`` (default 1): 0 runs the Triton forward wherever a config names a Gluon one."""
    return _env_flag("HF_ATTN_PLUGIN_GLUON", True)


def persistence_enabled() -> bool:
    return _env_flag("HF_ATTN_PLUGIN_TUNE_CACHE", True)


def _verbose() -> bool:
    return os.environ.get("HF_ATTN_PLUGIN_VERBOSE") == "1"


def _package_version() -> str:
    package = sys.modules.get(__name__.split(".")[0])
    version = getattr(package, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("hf_attn_plugin")
    except Exception:  # not installed and not imported as a package: still a stable name
        return "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def _gpu_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_attn_plugin"


def user_cache_path() -> Path:
    """Where this GPU's tuning results persist: one file per GPU name, Triton version and package version."""
    import triton

    return cache_dir() / (f"tuned-{_slug(_gpu_name())}-triton-{_slug(triton.__version__)}"
                          f"-hf_attn_plugin-{_slug(_package_version())}.json")


_USER: Dict[str, Table] = {}  # path -> results read this process
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read_user(path: Path) -> Table:
    try:
        with open(path) as f:
            return Table.from_json(json.load(f), str(path))
    except FileNotFoundError:
        return Table({})
    except (OSError, ValueError) as exc:  # unreadable or corrupt: ignored (and rewritten by the next tuning)
        _warn_once(f"hf_attn_plugin: ignoring the tuning results in {path}: {exc}")
        return Table({})


def _user_table() -> Table:
    if not persistence_enabled():
        return Table({})
    path = str(user_cache_path())
    if path not in _USER:
        _USER[path] = _read_user(Path(path))
    return _USER[path]


def _persist(key: Key, cfg: Config, fallback: Optional[Config] = None) -> None:
    """Add one result (and, for a Gluon winner, the fastest Triton config) to the user's file (re-read first:
    another process may have added its own)."""
    if not persistence_enabled():
        return
    import triton

    path = user_cache_path()
    table = _read_user(path)
    table.entries[key] = cfg
    table.fallbacks.pop(key, None)
    if fallback is not None:
        table.fallbacks[key] = fallback
    table.meta = dict(gpu=_gpu_name(), arch=gpu_arch(), triton=triton.__version__, package=_package_version(),
                      source="runtime tuning (HF_ATTN_PLUGIN_AUTOTUNE=1)")
    _USER[str(path)] = table
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(dumps_table(table.to_json()))
        os.replace(tmp, path)
    except OSError as exc:
        _warn_once(f"hf_attn_plugin: could not save tuning results to {path} ({exc}); they last for this process "
                   f"only (set HF_ATTN_PLUGIN_TUNE_CACHE=0 to stop trying, or XDG_CACHE_HOME to a writable folder)")


def clear_cache() -> None:
    """Forget every resolved key, the user's results read so far and the loaded tables (tests, or after editing
    a table file)."""
    CACHE.clear()
    _RAW.clear()
    _USER.clear()
    shipped_table.cache_clear()
    _has_cuda.cache_clear()


# ----------------------------------------------------------------------------------------------- lookup, tuning
def lookup(key: Key, options: Sequence[Config], arch: Optional[str] = None,
           triton_only: bool = False) -> Tuple[Config, str]:
    """``(config, source)`` without tuning; source: user, exact, nearest, plain or default. ``triton_only``: never a
    Gluon config (tables answer with their Triton fallbacks, see :meth:`Table.lookup`)."""
    arch = arch or gpu_arch()
    user = _user_table()
    hit = user.triton_view().get(key) if triton_only else user.entries.get(key)
    if hit is not None:
        return hit, "user"
    found = shipped_table(arch).lookup(key, triton_only)
    if found is not None:
        return found
    return default_for(key, options), "default"


# float32 at head dims padded to 256 (160, 192, 256): the first candidate that fits an H100/H200's shared memory. The
# lists' defaults are sized for 16-bit inputs; launch_fitting would compile and reject the float32 tiles one by one
# (the D 256 forward list: 6 of 7), a stall of minutes at the first call of each key.
_FP32_DEFAULTS = {("fwd", 256): Config(64, 32, 4, 1), ("bwd_dq", 256): Config(32, 32, 4, 1),
                  ("bwd_dkdv", 256): Config(32, 32, 4, 1)}


def default_for(key: Key, options: Sequence[Config]) -> Config:
    """The config used where no table entry applies: the candidate list's first entry, or for float32 at the 256
    bucket its small single-stage tile (:data:`_FP32_DEFAULTS`)."""
    fp32 = _FP32_DEFAULTS.get((key.kind, key.dim)) if key.dtype == "fp32" else None
    return fp32 if fp32 in options else options[0]


class Unsupported(Exception):
    """Raised by a ``launch`` given a candidate that cannot run this call (a Gluon forward for a call with features
    it lacks, or on a GPU / Triton without it): the tuner skips the candidate."""


def _unusable_config(exc: Exception) -> bool:
    """A candidate this GPU / compiler cannot run (the tuner skips it; the default candidate is known to compile)."""
    if isinstance(exc, Unsupported):
        return True
    name = type(exc).__name__
    return "OutOfResources" in name or "PTXASError" in name or "out of resource" in str(exc).lower()


def tune(options: Iterable[Config], launch: Callable[[Config], object], key: object = "") -> List[Tuple[Config, float]]:
    """Median milliseconds of ``launch(config)`` per usable candidate, fastest first (``launch`` must be idempotent:
    every kernel here fully rewrites its outputs). Candidates the compiler or the GPU rejects are skipped; other
    errors propagate. ``key`` (the :class:`Key` being tuned) labels the verbose output."""
    from triton.testing import do_bench

    verbose = _verbose()
    label = key.to_json() if isinstance(key, Key) else key
    timings = []
    for cfg in options:
        try:
            compiled = launch(cfg)
            ms = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as exc:  # out of shared memory / registers for this tile shape, or ptxas gave up on it
            if not _unusable_config(exc):
                raise
            if verbose:
                print(f"[hf_attn_plugin tune] {label} {cfg}: {type(exc).__name__}", flush=True)
            continue
        if verbose:
            regs = getattr(compiled, "n_regs", "?")
            spills = getattr(compiled, "n_spills", "?")
            print(f"[hf_attn_plugin tune] {label} {cfg}: {ms:.4f} ms regs={regs} spills={spills}", flush=True)
        timings.append((cfg, float(ms)))
    timings.sort(key=lambda t: t[1])
    return timings


KeyLike = Union[Key, Mapping]


def launch_fitting(kind: str, block_d: int, key: KeyLike, cfg: Config, launch: Callable[[Config], object], *,
                   triton_only: bool = False):
    """``launch(cfg)``; if this GPU rejects ``cfg`` for its resources (e.g. float32 tiles at head dims padded to
    256 need more shared memory than the default, sized for 16-bit inputs, leaves), the next candidate of the list
    that runs instead, remembered for the key so later calls go straight to it. Other errors propagate."""
    try:
        return launch(cfg)
    except Exception as exc:  # noqa: BLE001 - filtered below
        if not _unusable_config(exc):
            raise
        first = exc
    for alt in candidates(kind, block_d):
        if alt == cfg or alt.gluon >= 0:
            continue
        try:
            result = launch(alt)
        except Exception as exc:  # noqa: BLE001
            if not _unusable_config(exc):
                raise
            continue
        full = key if isinstance(key, Key) else Key.make(kind, block_d, **key)
        CACHE[(gpu_arch(), full, "triton") if triton_only else (gpu_arch(), full)] = alt
        _RAW.clear()  # raw memo entries may point at the rejected config
        if _verbose():
            print(f"[hf_attn_plugin config] {full.to_json()}: {cfg} does not fit this GPU ({first}); using {alt}",
                  flush=True)
        return result
    raise first



def triton_default(kind: str, block_d: int) -> Config:
    """The candidate list's default (a Triton config that runs every dtype), whatever ``candidates`` returns."""
    return _INTERPRET[kind] if interpreting() else _GPU[(kind, _dim_bucket(block_d))][0]


def pick(kind: str, block_d: int, key: KeyLike, launch: Optional[Callable[[Config], object]] = None, *,
         triton_only: bool = False) -> Config:
    """The config of ``kind`` at head-dim ``block_d`` for ``key`` (a :class:`Key`, or the keyword arguments of
    :meth:`Key.make`: ``dtype, causal, seq_q, seq_k, group`` and feature flags).

    ``launch(config)`` (idempotent) is benchmarked only under ``HF_ATTN_PLUGIN_AUTOTUNE=1`` for keys the tables do
    not hold exactly, never for ``q_len <= 16`` or during CUDA-graph capture; without ``launch`` nothing is tuned.
    A candidate list of one entry is used as it is.

    ``triton_only``: the best Triton config for the key (the flash forward asks for it when the pick was a Gluon
    config that cannot run the call): Gluon candidates left out, tables answer with their recorded Triton fallbacks,
    and a result tuned this way is not persisted (the Gluon config may still be the answer for other calls of the
    key, e.g. D=128 where a D=96 call of the same bucket cannot run Gluon).
    """
    options = candidates(kind, block_d)
    if triton_only:
        options = tuple(c for c in options if c.gluon < 0) or (triton_default(kind, block_d),)
    if len(options) == 1:  # the interpreter's fixed config, or a list of one
        return options[0]
    arch, raw = gpu_arch(), None
    if not isinstance(key, Key):  # every call of every layer comes here: a memo of the raw values in front
        raw = (arch, kind, block_d, triton_only, tuple(key), *key.values())
        hit = _RAW.get(raw)
        if hit is not None:
            return hit
        if len(_RAW) > 1 << 16:  # raw lengths: bounded memory whatever the length distribution
            _RAW.clear()
        key = Key.make(kind, block_d, **key)
    cache_key = (arch, key, "triton") if triton_only else (arch, key)
    hit = CACHE.get(cache_key)
    if hit is not None:
        if raw is not None:
            _RAW[raw] = hit
        return hit
    cfg, source = lookup(key, options, arch, triton_only)
    if (source not in ("user", "exact") and launch is not None and key.seq_q > SHORT_Q and autotune_enabled()):
        if torch.cuda.is_current_stream_capturing():
            return cfg  # not cached: a later call outside the capture tunes this key
        timings = tune(options, launch, key)
        if timings:
            cfg, source = timings[0][0], "tuned"
            if not triton_only:
                _persist(key, cfg, next((c for c, _ in timings if c.gluon < 0), None) if cfg.gluon >= 0 else None)
    if _verbose():
        print(f"[hf_attn_plugin config] {arch} {key.to_json()}{' (Triton only)' if triton_only else ''}: {cfg} "
              f"({source})", flush=True)
    CACHE[cache_key] = cfg
    if raw is not None:
        _RAW[raw] = cfg
    return cfg
