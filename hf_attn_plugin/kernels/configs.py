"""Launch configurations for the flash kernels, tuned once per small bucketed key and cached.

We do not use ``@triton.autotune``: it fails under the Triton interpreter, it cannot run while a
CUDA graph is being captured, and its key would be the raw sequence length (one tuning run per new
length during variable-length training). Instead :func:`pick` keys on a tuple of compile-time
features plus power-of-two buckets of the sequence lengths, benchmarks a short list of candidates
the first time a key is seen (``triton.testing.do_bench``) and caches the winner for the process.

* ``TRITON_INTERPRET=1``: a fixed small config (tiles of 16/32 rows, so that the CPU tests cross
  many tile boundaries on short sequences).
* ``HF_ATTN_PLUGIN_AUTOTUNE=0``: always the first (default) candidate, no benchmarking.
* While a CUDA graph is being captured: the cached winner if there is one, else the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch

__all__ = ["Config", "interpreting", "candidates", "pick", "seq_bucket", "CACHE"]


@dataclass(frozen=True)
class Config:
    """``block_m``: query rows per tile; ``block_n``: key rows per tile (in every kernel).

    ``warp_spec`` (forward, dK/dV): Triton's warp specialization of the kernel's one loop; ``num_warps`` is then
    the size of each consumer warpgroup (Triton adds a producer warpgroup that issues the TMA loads and splits
    the stationary tile over two consumers).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_spec: bool = False

    def __post_init__(self):
        if self.warp_spec and self.num_stages > 2:
            # Triton 3.6 on the H200: warp-specialized forwards with 3 stages returned NaN / wrong LSE (128x64 at
            # D=128, 128x128 at D=64) while 1 and 2 stages matched the reference; never offered to the tuner.
            raise ValueError("warp-specialized configs are limited to num_stages <= 2 (miscompiled with more)")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Interpreter: small tiles, block_m != block_n so that both alignments are exercised.
_INTERPRET = {
    "fwd": Config(32, 16, 4, 1),
    "bwd_dq": Config(32, 16, 4, 1),
    "bwd_dkdv": Config(16, 32, 4, 1),
    "bwd_pre": Config(32, 16, 4, 1),
}

# Hopper candidates, default first. wgmma wants >= 64 rows per warpgroup; head_dim 128 at 128x128
# tiles sits at the register limit, so the larger tiles are only tried where they can fit.
_GPU: Dict[Tuple[str, int], Sequence[Config]] = {
    ("fwd", 64): (Config(128, 128, 8, 3), Config(128, 64, 4, 3), Config(128, 128, 4, 3)),
    # Forward: no 2-stage candidates without warp specialization: with TMA loads, ptxas (Triton 3.6's) crashes on
    # them (checked by compiling for sm_90 on a CPU machine; 1 and 3 stages compile). Warp-specialized candidates
    # (H200, session 4, same process): D=256 +23% (601 vs 490 TFLOP/s at S=8k), D=128 +13% at S=1k but -1..-4% at
    # 4k-16k (the tuner decides per bucket), D=64 -25% (none listed).
    # D=128: 128x128 tiles win every bf16 bucket from S=4k to 16k when tuned (H200, TMA forward, run 4: 4.36 vs
    # 4.63 ms at 16k), but the default (used untuned: HF_ATTN_PLUGIN_AUTOTUNE=0, CUDA-graph capture) must fit every
    # dtype: fp32 128x128 tiles need 393 KB of shared memory, 128x64 fit (230 KB).
    ("fwd", 128): (Config(128, 64, 8, 3), Config(128, 128, 8, 3), Config(128, 64, 4, 3), Config(128, 64, 8, 4),
                   Config(128, 32, 4, 4), Config(128, 128, 4, 2, True), Config(128, 128, 4, 1, True)),
    ("fwd", 256): (Config(128, 32, 8, 3), Config(64, 32, 4, 3), Config(64, 64, 4, 3), Config(128, 64, 8, 1),
                   Config(128, 64, 4, 1, True), Config(128, 64, 4, 2, True)),
    ("bwd_dq", 64): (Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(128, 128, 8, 2)),
    ("bwd_dq", 128): (Config(128, 64, 8, 2), Config(64, 64, 4, 3), Config(64, 128, 8, 2), Config(128, 64, 8, 3),
                      Config(128, 32, 8, 3)),
    ("bwd_dq", 256): (Config(64, 64, 4, 1), Config(64, 32, 4, 2), Config(128, 32, 8, 1)),
    ("bwd_dkdv", 64): (Config(64, 128, 8, 2), Config(32, 128, 4, 2), Config(64, 64, 4, 3), Config(64, 128, 4, 2, True)),
    # dK and dV accumulate in registers for the whole program: [BLOCK_N, D] fp32 each. At D=128 a
    # 128-row KV tile spills on 8 warps (114-214 spilled registers); 64-row KV tiles on 8 warps were
    # 2x slower still (likely: two warpgroups share a 64-row wgmma M dimension); one warpgroup on a
    # 64-row KV tile with 32-row query tiles was fastest (H200 run 2, MHA S=16k: 3.96 ms vs 5.62 ms
    # for the best run-1 config; see benchmarks/NOTES_flash.md).
    ("bwd_dkdv", 128): (Config(32, 64, 4, 3), Config(64, 128, 8, 2), Config(64, 64, 8, 3), Config(32, 64, 4, 4),
                        Config(16, 64, 4, 4), Config(64, 64, 4, 2), Config(32, 128, 8, 3), Config(64, 128, 4, 2, True)),
    # ^ warp-specialized 64x128 (two 64-row consumers): ~2% faster where picked (session 4); WS 32x128 and 64x64
    #   were 10-50% slower at every shape and are not listed (benchmarks/results/flash_ws_bwd_variants_log.txt).
    ("bwd_dkdv", 256): (Config(64, 64, 8, 1), Config(32, 64, 8, 2), Config(64, 32, 8, 2)),
    ("bwd_pre", 64): (Config(128, 0, 4, 1),),
    ("bwd_pre", 128): (Config(128, 0, 4, 1),),
    ("bwd_pre", 256): (Config(64, 0, 4, 1),),
}

CACHE: Dict[tuple, Config] = {}


def _dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def seq_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length, clamped to [128, 32768]."""
    return min(max(triton_next_pow2(max(n, 1)), 128), 32768)


def triton_next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def candidates(kind: str, block_d: int) -> Sequence[Config]:
    if interpreting():
        return (_INTERPRET[kind],)
    return _GPU[(kind, _dim_bucket(block_d))]


def _unusable_config(exc: Exception) -> bool:
    """A candidate this GPU / compiler cannot run (the tuner skips it; the default candidate is known to compile)."""
    name = type(exc).__name__
    return "OutOfResources" in name or "PTXASError" in name or "out of resource" in str(exc).lower()


def pick(kind: str, block_d: int, key: tuple, launch: Callable[[Config], None]) -> Config:
    """The config for ``(kind, block_d, key)``, benchmarking ``launch(config)`` on first sight.

    ``launch`` must be idempotent (every kernel here fully rewrites its outputs).
    """
    options = candidates(kind, block_d)
    if len(options) == 1 or interpreting():
        return options[0]
    full_key = (kind, block_d) + tuple(key)
    hit = CACHE.get(full_key)
    if hit is not None:
        return hit
    if os.environ.get("HF_ATTN_PLUGIN_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return options[0]
    from triton.testing import do_bench

    verbose = os.environ.get("HF_ATTN_PLUGIN_VERBOSE") == "1"
    best, best_ms = options[0], float("inf")
    for cfg in options:
        try:
            compiled = launch(cfg)
            ms = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as exc:  # out of shared memory / registers for this tile shape, or ptxas gave up on it
            if not _unusable_config(exc):
                raise
            if verbose:
                print(f"[hf_attn_plugin tune] {full_key} {cfg}: {type(exc).__name__}", flush=True)
            continue
        if verbose:
            regs = getattr(compiled, "n_regs", "?")
            spills = getattr(compiled, "n_spills", "?")
            print(f"[hf_attn_plugin tune] {full_key} {cfg}: {ms:.4f} ms regs={regs} spills={spills}", flush=True)
        if ms < best_ms:
            best, best_ms = cfg, ms
    CACHE[full_key] = best
    return best
