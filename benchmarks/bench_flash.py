"""Side-by-side attention benchmark: ours vs SDPA (cuDNN, flash) vs compiled FlexAttention.

One process, ``triton.testing.do_bench`` medians, bf16. FLOPs: ``4 * B * Hq * S^2 * D`` (/2 causal,
x3.5 for forward+backward); sliding window counts only the visible (query, key) pairs.

    python benchmarks/bench_flash.py --out DIR [--seqlens 1024,4096] [--modes fwd]
    python benchmarks/bench_flash.py --out DIR --models     # the shapes real models have -> DIR/flash_models.csv

writes ``DIR/flash_fwd.csv``, ``DIR/flash_fwdbwd.csv``, ``DIR/flash_window.csv`` (columns gpu, torch,
triton, date, impl, mode, S, B, Hq, Hkv, D, ms, tflops) and ``DIR/flash.png``, and prints a table.
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch
import torch.nn.functional as F
from common import append_rows, bench_ms, print_device, pyplot, run_meta

from hf_attn_plugin import ops

FIELDS = ["gpu", "torch", "triton", "date", "impl", "mode", "S", "B", "Hq", "Hkv", "D", "ms", "tflops"]


def visible_pairs(s: int, causal: bool, window: int) -> float:
    if window:
        w = min(window, s)
        return w * (w + 1) / 2 + (s - w) * w
    return s * (s + 1) / 2 if causal else float(s * s)


def flops(b, hq, s, d, causal, window, mode):
    f = 4.0 * b * hq * d * (visible_pairs(s, causal, window) if window else (s * s / 2 if causal else s * s))
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def make_impls(b, s, hq, hkv, d, causal, window, softcap=0.0):
    """name -> (inputs, fn(q, k, v) -> out). Inputs are fresh random bf16 tensors per impl.

    SDPA gets GQA natively (``enable_gqa=True``) where its backend takes it; otherwise K/V are repeated first (what
    transformers' sdpa path does then), and the impl name says so (``+repeat``). SDPA has no softcap: skipped there.
    """
    dev, dt = "cuda", torch.bfloat16
    impls = {}

    def bshd():
        return (torch.randn(b, s, hq, d, device=dev, dtype=dt), torch.randn(b, s, hkv, d, device=dev, dtype=dt),
                torch.randn(b, s, hkv, d, device=dev, dtype=dt))

    def bhsd():
        return (torch.randn(b, hq, s, d, device=dev, dtype=dt), torch.randn(b, hkv, s, d, device=dev, dtype=dt),
                torch.randn(b, hkv, s, d, device=dev, dtype=dt))

    impls["ours"] = (bshd, lambda q, k, v: ops.attention(q, k, v, causal=causal, window=window or None,
                                                          softcap=softcap or None))

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if softcap:
        pass
    elif not window:
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            native = hq == hkv or _sdpa_takes_gqa(backend, d)

            def sdpa(q, k, v, backend=backend, native=native):
                with sdpa_kernel(backend):
                    if not native:
                        k = k.repeat_interleave(hq // hkv, dim=1)
                        v = v.repeat_interleave(hq // hkv, dim=1)
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv and native)
            impls[name if native else name + "+repeat"] = (bhsd, sdpa)
    else:
        i = torch.arange(s, device=dev)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

        def sdpa_mask(q, k, v):
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        impls["sdpa_mask"] = (bhsd, sdpa_mask)

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(bi, hi, qi, ki):
        keep = qi >= ki
        if window:
            keep = keep & (ki > qi - window)
        return keep

    def score_mod(score, bi, hi, qi, ki):
        return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, None, None, s, s, device=dev) if (causal or window) else None
    flex = torch.compile(flex_attention, dynamic=False)
    impls["flex"] = (bhsd, lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=hq != hkv,
                                                score_mod=score_mod if softcap else None))
    return impls


_GQA_SUPPORT = {}


def _sdpa_takes_gqa(backend, d) -> bool:
    """Whether SDPA's ``backend`` runs ``enable_gqa=True`` itself (probed once on a small input)."""
    from torch.nn.attention import sdpa_kernel

    if (backend, d) not in _GQA_SUPPORT:
        q = torch.randn(1, 4, 128, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 2, 128, d, device="cuda", dtype=torch.bfloat16)
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            _GQA_SUPPORT[(backend, d)] = True
        except RuntimeError:
            _GQA_SUPPORT[(backend, d)] = False
    return _GQA_SUPPORT[(backend, d)]


# The shapes real models have (issue 16): name, B, S, Hq, Hkv, D, causal, window, softcap.
MODEL_SHAPES = [
    ("llama3-8b D128 GQA", 1, 16384, 32, 8, 128, True, 0, 0.0),
    ("llama3-8b D128 GQA", 4, 4096, 32, 8, 128, True, 0, 0.0),
    ("llama3-8b D128 GQA", 16, 1024, 32, 8, 128, True, 0, 0.0),
    ("llama3-8b D128 GQA", 32, 512, 32, 8, 128, True, 0, 0.0),
    ("smollm2 D64 9/3", 8, 2048, 9, 3, 64, True, 0, 0.0),
    ("llama3.2-1b D64 32/8", 4, 4096, 32, 8, 64, True, 0, 0.0),
    ("llama3.2-1b D64 32/8", 16, 1024, 32, 8, 64, True, 0, 0.0),
    ("llama3.2-1b D64 32/8", 32, 512, 32, 8, 64, True, 0, 0.0),
    ("phi3 D96 MHA", 4, 3072, 32, 32, 96, True, 0, 0.0),
    ("bert D64 non-causal", 32, 512, 12, 12, 64, False, 0, 0.0),
    ("encoder D128 non-causal", 4, 4096, 32, 32, 128, False, 0, 0.0),
    ("gemma2 D256 softcap50", 4, 4096, 8, 4, 256, True, 0, 50.0),
    ("mistral D128 window4096", 1, 16384, 32, 8, 128, True, 4096, 0.0),
]


def run_models(args, meta):
    """One row per (model shape, impl, mode) into flash_models.csv: the table users read."""
    path = os.path.join(args.out, "flash_models.csv")
    if os.path.exists(path):  # a fresh table per run
        os.remove(path)
    fields = FIELDS[:4] + ["shape", "causal", "window", "softcap"] + FIELDS[4:]
    for name, b, s, hq, hkv, d, causal, window, softcap in MODEL_SHAPES:
        impls = make_impls(b, s, hq, hkv, d, causal, window, softcap)
        for mode in args.modes.split(","):
            for impl, (inputs_fn, fn) in impls.items():
                if impl == "sdpa_mask" and mode == "fwdbwd":
                    continue
                try:
                    ms = measure(inputs_fn, fn, mode)
                except Exception as exc:
                    print(f"FAILED {name} {impl} {mode}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                tf = flops(b, hq, s, d, causal, window, mode) / ms / 1e9
                row = dict(meta, shape=name, causal=causal, window=window, softcap=softcap, impl=impl, mode=mode,
                           S=s, B=b, Hq=hq, Hkv=hkv, D=d, ms=round(ms, 4), tflops=round(tf, 1))
                append_rows(path, [row], fields)  # as we go: a timeout keeps what ran
                print(f"{name:26s} B={b:2d} S={s:5d} {mode:6s} {impl:18s} {ms:8.3f} ms {tf:6.1f} TFLOP/s", flush=True)
        del impls
        torch.cuda.empty_cache()


def measure(inputs_fn, fn, mode):
    q, k, v = inputs_fn()
    if mode == "fwd":
        with torch.no_grad():
            return bench_ms(lambda: fn(q, k, v), warmup=20, rep=80)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(fn(q, k, v))

    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return bench_ms(step, warmup=20, rep=80)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--no-window", action="store_true")
    ap.add_argument("--models", action="store_true",
                    help="only the shapes real models have (MODEL_SHAPES: D 64/96/128/256, window, softcap, non-causal)"
                         " into flash_models.csv")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print_device()
    meta = run_meta("gpu", "torch", "triton", "date")
    if args.models:
        torch._dynamo.config.cache_size_limit = 256
        run_models(args, meta)
        return
    for table in ("fwd", "fwdbwd", "window"):
        if os.path.exists(os.path.join(args.out, f"flash_{table}.csv")):
            os.remove(os.path.join(args.out, f"flash_{table}.csv"))
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    d, tokens = 128, 16384
    seqlens = [int(x) for x in args.seqlens.split(",")]
    heads = [(32, 8), (16, 16)]
    rows = {"fwd": [], "fwdbwd": [], "window": []}

    def record(table, impl, mode, s, b, hq, hkv, ms, causal=True, window=0):
        tf = flops(b, hq, s, d, causal, window, "fwdbwd" if mode.endswith("fwdbwd") else "fwd") / ms / 1e9
        row = dict(meta, impl=impl, mode=mode, S=s, B=b, Hq=hq, Hkv=hkv, D=d, ms=round(ms, 4), tflops=round(tf, 1))
        rows[table].append(row)
        append_rows(os.path.join(args.out, f"flash_{table}.csv"), [row], FIELDS)  # as we go: a timeout keeps what ran
        print(f"{mode:14s} {impl:11s} S={s:6d} B={b:3d} H={hq}/{hkv} {ms:9.3f} ms {tf:7.1f} TFLOP/s", flush=True)

    for hq, hkv in heads:
        for s in seqlens:
            b = max(tokens // s, 1)
            impls = make_impls(b, s, hq, hkv, d, True, 0)
            for mode in args.modes.split(","):
                for name, (inputs_fn, fn) in impls.items():
                    try:
                        record(mode, name, "causal_" + mode, s, b, hq, hkv, measure(inputs_fn, fn, mode))
                    except Exception as exc:  # keep going: one failing backend must not lose the run
                        print(f"FAILED {name} {mode} S={s}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            del impls
            torch.cuda.empty_cache()
    if not args.no_window:
        for s in (16384, 32768):
            impls = make_impls(1, s, 32, 8, d, True, 4096)
            for mode in ("fwd", "fwdbwd"):
                for name, (inputs_fn, fn) in impls.items():
                    if name == "sdpa_mask" and (mode == "fwdbwd" or s > 16384):
                        continue  # a [S, S] mask path: slow and memory hungry; one point is enough
                    try:
                        record("window", name, "window4096_" + mode, s, 1, 32, 8, measure(inputs_fn, fn, mode),
                               window=4096)
                    except Exception as exc:
                        print(f"FAILED {name} window {mode} S={s}: {type(exc).__name__}: {str(exc)[:200]}")
            del impls
            torch.cuda.empty_cache()

    summarize(rows)
    try:
        plot(rows, os.path.join(args.out, "flash.png"))
    except Exception:
        traceback.print_exc()


def summarize(rows):
    print("\nratios (ours / other, TFLOP/s):")
    for table, data in rows.items():
        by = {}
        for r in data:
            by.setdefault((r["mode"], r["S"], r["Hq"], r["Hkv"]), {})[r["impl"]] = r["tflops"]
        for key, vals in sorted(by.items()):
            if "ours" not in vals:
                continue
            ratios = " ".join(f"{k}={vals['ours'] / v:.2f}x" for k, v in vals.items() if k != "ours" and v)
            print(f"{key[0]:20s} S={key[1]:6d} H={key[2]}/{key[3]} ours={vals['ours']:6.1f}  {ratios}")


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    panels = [(t, m, h) for t in ("fwd", "fwdbwd") for m in (t,) for h in ((32, 8), (16, 16))]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4))
    for ax, (table, mode, (hq, hkv)) in zip(axes, panels):
        data = [r for r in rows[table] if r["Hq"] == hq and r["Hkv"] == hkv]
        for impl in sorted({r["impl"] for r in data}):
            pts = sorted((r["S"], r["tflops"]) for r in data if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"causal {mode}, Hq/Hkv={hq}/{hkv}, D=128")
        ax.set_xlabel("S (B*S=16k)")
        ax.set_ylabel("TFLOP/s")
        ax.legend()
    ax = axes[-1]
    data = rows["window"]
    groups = sorted({(r["S"], r["mode"].split("_")[1]) for r in data})
    impls = sorted({r["impl"] for r in data})
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        vals = {(r["S"], r["mode"].split("_")[1]): r["tflops"] for r in data if r["impl"] == impl}
        ax.bar([i + j * width for i in range(len(groups))], [vals.get(g, 0) for g in groups], width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{s // 1024}k {m}" for s, m in groups])
    ax.set_title("window 4096, Hq/Hkv=32/8: useful TFLOP/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
