#!/usr/bin/env python
"""Every head dim a Hugging Face model has: ours vs SDPA (cuDNN, flash) vs compiled FlexAttention, one process.

Head dims 32, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256 at one shape (B=8, S=2048, 16/16 heads, causal, bf16),
forward and forward+backward; ``do_bench`` medians as in ``bench_flash.py`` (same inputs, FLOPs, impls).

    python benchmarks/bench_head_dims.py --out DIR [--dims 64,96] [--modes fwd]

Writes ``DIR/head_dims.csv`` (columns: gpu, torch, triton, date, impl, mode, S, B, Hq, Hkv, D, ms, tflops); an impl
that has no kernel for a head dim is printed as ``FAILED`` and has no row.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench_flash import FIELDS, flops, make_impls, measure
from common import append_rows, print_device, run_meta

DIMS = (32, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for head_dims.csv")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)))
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 256
    print_device()
    meta = run_meta("gpu", "torch", "triton", "date")
    path = os.path.join(args.out, "head_dims.csv")
    if os.path.exists(path):
        os.remove(path)
    b, s, h = args.batch, args.seqlen, args.heads
    for d in (int(x) for x in args.dims.split(",")):
        impls = make_impls(b, s, h, h, d, True, 0)
        for mode in args.modes.split(","):
            for impl, (inputs_fn, fn) in impls.items():
                try:
                    ms = measure(inputs_fn, fn, mode)
                except Exception as exc:  # e.g. a backend without this head dim: no row, the run goes on
                    print(f"FAILED D={d} {impl} {mode}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                tf = flops(b, h, s, d, True, 0, mode) / ms / 1e9
                row = dict(meta, impl=impl, mode=mode, S=s, B=b, Hq=h, Hkv=h, D=d, ms=round(ms, 4), tflops=round(tf, 1))
                append_rows(path, [row], FIELDS)  # as we go: a run cut short keeps what it measured
                print(f"D={d:3d} {mode:6s} {impl:18s} {ms:8.3f} ms {tf:6.1f} TFLOP/s", flush=True)
        del impls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
