"""Host time of one attention forward and forward + backward call, ours beside SDPA (cuDNN, flash backends).

At small shapes a training step's attention is bound by host time, not by the kernels (README: SmolLM2's shape
forward + backward takes ~0.6 ms more than its kernels). This script measures, on a GPU:

* host time per call: ``N`` calls back to back with no synchronisation, at a tiny shape whose kernels finish
  long before the next launch, so the loop's wall time is the host's;
* wall time per call at SmolLM2's training shape (B 8, 9/3 heads, D 64, S 2k), where kernels and host compete;
* a cProfile of our forward + backward at the tiny shape (top functions by own time): where the host time goes.

    python benchmarks/profile_host_fwdbwd.py [--n 300] [--profile-rows 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_attn_plugin
from hf_attn_plugin import ops


def make(b, hq, hkv, s, d, layout):
    """q, k, v with requires_grad; ``layout`` "bshd" (ours) or "bhsd" (SDPA, K/V repeated to hq heads)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    heads = (hq, hkv, hkv) if layout == "bshd" else (hq, hq, hq)
    shape = (lambda h: (b, s, h, d)) if layout == "bshd" else (lambda h: (b, h, s, d))
    return [torch.randn(shape(h), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for h in heads]


def calls(shape):
    b, hq, hkv, s, d = shape
    qo, ko, vo = make(b, hq, hkv, s, d, "bshd")
    qs, ks, vs = make(b, hq, hkv, s, d, "bhsd")
    dout_o = torch.randn_like(qo)
    dout_s = torch.randn_like(qs)

    def ours(bwd):
        out = ops.attention(qo, ko, vo, causal=True)
        if bwd:
            out.backward(dout_o)

    def sdpa(backend):
        def run(bwd):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            if bwd:
                out.backward(dout_s)
        return run

    return {"ours": ours, "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}


def per_call_ms(fn, bwd, n):
    for _ in range(20):
        fn(bwd)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(bwd)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return 1e3 * host / n, 1e3 * wall / n


def pieces(shape, n):
    """Host time of the parts of our call, each alone in a loop (no synchronisation inside)."""
    from hf_attn_plugin.kernels import flash
    from hf_attn_plugin.kernels.params import AttentionParams

    b, hq, hkv, s, d = shape
    q, k, v = (t.detach() for t in make(b, hq, hkv, s, d, "bshd"))
    params = AttentionParams.create(d, causal=True)
    out, lse = flash.flash_attn_forward(q, k, v, params)
    dout = torch.randn_like(out)
    parts = {
        "flash_attn_forward": lambda: flash.flash_attn_forward(q, k, v, params),
        "flash_attn_backward": lambda: flash.flash_attn_backward(dout, q, k, v, out, lse, params),
        "torch.empty x4 (dq dk dv delta)": lambda: [torch.empty_like(t) for t in (q, k, v, lse)],
        "get_device_capability": lambda: torch.cuda.get_device_capability(q.device),
    }
    try:
        from hf_attn_plugin.kernels import gluon_bwd

        parts["gluon_bwd.rows_descriptor x6"] = lambda: [gluon_bwd.rows_descriptor(t, 64) for t in (q, k, v, dout, k, v)]
        parts["gluon_bwd._stat_descriptor x2"] = lambda: [gluon_bwd._stat_descriptor(lse, 64) for _ in range(2)]
        parts["gluon_bwd.unsupported_reason"] = lambda: gluon_bwd.unsupported_reason(q, k, v, params)
    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
        print(f"gluon pieces skipped: {exc!r}")
    for name, part in parts.items():
        for _ in range(10):
            part()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            part()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        print(f"piece {name:34s} host {1e3 * host / n:7.3f} ms/call  wall {1e3 * (time.perf_counter() - t0) / n:7.3f}")


def where_backward_runs(shape, n):
    """Our backward's host time by where it runs: the main thread, another Python thread, inside autograd (timed
    inside ``backward``); and the autograd engine's own cost (a Function whose backward only allocates)."""
    import threading

    from hf_attn_plugin.kernels import flash
    from hf_attn_plugin.kernels.params import AttentionParams

    b, hq, hkv, s, d = shape
    q, k, v = make(b, hq, hkv, s, d, "bshd")
    params = AttentionParams.create(d, causal=True)
    out, lse = flash.flash_attn_forward(q.detach(), k.detach(), v.detach(), params)
    dout = torch.randn_like(out)
    inside = []

    def bwd():
        return flash.flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, params)

    def loop(fn, count):
        t0 = time.perf_counter()
        for _ in range(count):
            fn()
        return 1e3 * (time.perf_counter() - t0) / count

    class Timed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q_, k_, v_):
            return out.clone()

        @staticmethod
        def backward(ctx, g):
            t0 = time.perf_counter()
            dq, dk, dv, _ = bwd()
            inside.append(time.perf_counter() - t0)
            return dq, dk, dv

    class Null(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q_, k_, v_):
            return out.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    loop(bwd, 20)
    torch.cuda.synchronize()
    print(f"backward, main thread         {loop(bwd, n):7.3f} ms/call")
    torch.cuda.synchronize()
    res = {}
    th = threading.Thread(target=lambda: (loop(bwd, 20), res.setdefault("t", loop(bwd, n))))
    th.start(), th.join()
    torch.cuda.synchronize()
    print(f"backward, a Python thread     {res['t']:7.3f} ms/call")
    for name, fn in (("Timed", Timed), ("Null", Null)):
        for _ in range(20):
            fn.apply(q, k, v).backward(dout)
        torch.cuda.synchronize()
        inside.clear()
        t = loop(lambda: fn.apply(q, k, v).backward(dout), n)
        torch.cuda.synchronize()
        extra = f", inside backward {1e3 * sum(inside) / len(inside):7.3f} ms" if inside else ""
        print(f"autograd fwd+bwd, {name:5s}       {t:7.3f} ms/call{extra}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="calls per measurement")
    ap.add_argument("--profile-rows", type=int, default=30)
    args = ap.parse_args()
    print(f"hf_attn_plugin {hf_attn_plugin.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    shapes = {"tiny B1 H2/1 S128 D64": (1, 2, 1, 128, 64), "SmolLM2 B8 H9/3 S2k D64": (8, 9, 3, 2048, 64)}
    for label, shape in shapes.items():
        fns = calls(shape)
        for bwd in (False, True):
            for name, fn in fns.items():
                host, wall = per_call_ms(fn, bwd, args.n)
                print(f"{label:26s} {'fwd+bwd' if bwd else 'fwd':8s} {name:11s} host {host:7.3f} ms/call  "
                      f"wall {wall:7.3f} ms/call")
    pieces(shapes["SmolLM2 B8 H9/3 S2k D64"], args.n)
    where_backward_runs(shapes["SmolLM2 B8 H9/3 S2k D64"], args.n)
    fn = calls(shapes["SmolLM2 B8 H9/3 S2k D64"])["ours"]
    per_call_ms(fn, True, 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fn(True)
        torch.cuda.synchronize()
    print("\n=== torch.profiler, ours fwd+bwd at SmolLM2's shape, 20 calls (CPU side) ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    fn = calls(shapes["tiny B1 H2/1 S128 D64"])["ours"]
    for bwd in (False, True):
        per_call_ms(fn, bwd, 50)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.n):
            fn(bwd)
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_rows)
        print(f"\n=== cProfile, ours {'fwd+bwd' if bwd else 'fwd'}, {args.n} calls (times are totals) ===")
        print(buf.getvalue())


if __name__ == "__main__":
    main()
