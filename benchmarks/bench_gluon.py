"""Forward benchmark of the experimental Gluon kernel (hf_attn_plugin/kernels/gluon_fwd.py), one process, bf16:
gluon vs our Triton forward (ops.attention) vs SDPA cuDNN / flash vs compiled FlexAttention.

    python benchmarks/bench_gluon.py --out DIR [--skip gluon_ws3,...]

Gluon variants (``warp_spec`` of gluon_fwd.gluon_attn_forward): gluon (0: no warp specialization), gluon_ws1
(1-warp TMA producer), gluon_ws2 (producer + two consumer-warpgroup partitions), gluon_ws3 (ws2 + ping-pong).
TFLOP/s with FLOPs ``4 * B * Hq * S^2 * D`` (/2 if causal); ``triton.testing.do_bench`` medians. Before timing,
each shape checks every Gluon variant against ours (max abs difference of out, printed as ``maxdiff``). Writes
``DIR/gluon_fwd.csv`` (gpu, torch, triton, date, impl, causal, S, B, Hq, Hkv, D, ms, tflops, maxdiff) as it
goes, and prints a table with ratios gluon / other.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from common import append_rows, bench_ms, print_device, run_meta

from hf_attn_plugin import ops
from hf_attn_plugin.kernels import gluon_fwd

FIELDS = ["gpu", "torch", "triton", "date", "impl", "causal", "S", "B", "Hq", "Hkv", "D", "ms", "tflops", "maxdiff"]
# (D, B, S, Hq, Hkv, causal)
SHAPES = [
    (64, 8, 2048, 9, 3, True),
    (64, 4, 4096, 32, 8, True),
    (128, 1, 16384, 32, 8, True),
    (128, 8, 2048, 32, 8, True),
    (128, 4, 4096, 32, 32, False),
]
GLUONS = ("gluon", "gluon_ws1", "gluon_ws2", "gluon_ws3")  # warp_spec 0..3 (gluon_fwd.gluon_attn_forward)
IMPLS = GLUONS + ("ours", "sdpa_cudnn", "sdpa_flash", "flex")


def tflops(b, hq, s, d, causal, ms):
    return 4.0 * b * hq * s * s * d / (2 if causal else 1) / ms / 1e9


def make_impls(b, s, hq, hkv, d, causal):
    """name -> fn() running one forward on inputs made here ([B, S, H, D] for ours/gluon, [B, H, S, D] else)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev, dt, scale = "cuda", torch.bfloat16, d**-0.5
    q = torch.randn(b, s, hq, d, device=dev, dtype=dt)
    k = torch.randn(b, s, hkv, d, device=dev, dtype=dt)
    v = torch.randn(b, s, hkv, d, device=dev, dtype=dt)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    kr, vr = kt.repeat_interleave(hq // hkv, dim=1), vt.repeat_interleave(hq // hkv, dim=1)

    def gluon(warp_spec=0):
        return gluon_fwd.gluon_attn_forward(q, k, v, ops.AttentionParams(scale, causal), warp_spec=warp_spec)[0]

    def ours():
        return ops.attention(q, k, v, causal=causal)

    def sdpa(backend, gqa_native):
        def run():
            with sdpa_kernel(backend):
                if gqa_native:
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
                return F.scaled_dot_product_attention(qt, kr, vr, is_causal=causal)  # flash: no native GQA
        return run

    block_mask = create_block_mask(lambda bi, hi, qi, ki: qi >= ki, None, None, s, s, device=dev) if causal else None
    flex = torch.compile(flex_attention, dynamic=False)

    return {
        "gluon": gluon,
        "gluon_ws1": lambda: gluon(warp_spec=1),
        "gluon_ws2": lambda: gluon(warp_spec=2),
        "gluon_ws3": lambda: gluon(warp_spec=3),
        "ours": ours,
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION, False),
        "flex": lambda: flex(qt, kt, vt, block_mask=block_mask, enable_gqa=hq != hkv),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--skip", default="", help="comma-separated implementations to leave out, e.g. gluon_ws3")
    args = ap.parse_args()
    skip = {x for x in args.skip.split(",") if x}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gluon_fwd.csv")
    if os.path.exists(path):
        os.remove(path)
    torch._dynamo.config.cache_size_limit = 256
    print_device()
    meta = run_meta("gpu", "torch", "triton", "date")
    table = {}
    for d, b, s, hq, hkv, causal in SHAPES:
        impls = make_impls(b, s, hq, hkv, d, causal)
        maxdiff = {}
        for name in (n for n in GLUONS if n not in skip):
            try:
                with torch.no_grad():
                    maxdiff[name] = (impls[name]().float() - impls["ours"]().float()).abs().max().item()
            except Exception as exc:  # keep going: report the failure, time the others
                print(f"FAILED {name} check D={d} S={s}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        for name in (n for n in IMPLS if n not in skip):
            try:
                with torch.no_grad():
                    ms = bench_ms(impls[name], warmup=25, rep=100)
            except Exception as exc:
                print(f"FAILED {name} D={d} S={s}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            tf = tflops(b, hq, s, d, causal, ms)
            row = dict(meta, impl=name, causal=causal, S=s, B=b, Hq=hq, Hkv=hkv, D=d, ms=round(ms, 4),
                       tflops=round(tf, 1), maxdiff=f"{maxdiff[name]:.3e}" if name in maxdiff else "")
            table.setdefault((d, b, s, hq, hkv, causal), {})[name] = tf
            append_rows(path, [row], FIELDS)  # as it goes: a timeout keeps what ran
            print(f"D={d:3d} B={b} S={s:6d} H={hq}/{hkv} causal={causal!s:5s} {name:10s} {ms:8.3f} ms "
                  f"{tf:6.1f} TFLOP/s" + (f"  maxdiff vs ours {maxdiff[name]:.2e}" if name in maxdiff else ""),
                  flush=True)
        del impls
        torch.cuda.empty_cache()

    print("\n| D | B | S | Hq/Hkv | causal | " + " | ".join(IMPLS) + " | best gluon/cuDNN | best gluon/ours |")
    print("|---|---|---|---|---|" + "---|" * (len(IMPLS) + 2))
    for (d, b, s, hq, hkv, causal), vals in table.items():
        cells = " | ".join(f"{vals[n]:.0f}" if n in vals else "-" for n in IMPLS)
        g = max(vals.get(n, 0.0) for n in GLUONS)
        r1 = f"{g / vals['sdpa_cudnn']:.2f}x" if g and vals.get("sdpa_cudnn") else "-"
        r2 = f"{g / vals['ours']:.2f}x" if g and vals.get("ours") else "-"
        print(f"| {d} | {b} | {s} | {hq}/{hkv} | {causal} | {cells} | {r1} | {r2} |")


if __name__ == "__main__":
    main()
