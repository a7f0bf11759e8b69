"""Gluon kernels on or off (``HF_ATTN_PLUGIN_GLUON``), interleaved in one process: is the Gluon path worth its host
time?

The launch-config tables choose the Gluon forward / dK/dV kernels by kernel time (``tune_tables.py`` times one launch
at a time), but a Gluon launch costs more host time than a Triton one (eight host-side TMA descriptors per dK/dV
launch). At shapes where a call is short, the whole op can be host-bound. This measures ``ops.attention`` forward and
forward + backward (``triton.testing.do_bench``, as ``bench_flash.py``) with Gluon on and off, alternating, three
rounds each, at the shapes of ``bench_flash.py --models`` that the Gluon kernels can run (D 64/128, no features).

    python benchmarks/probe_gluon_ab.py
"""

from __future__ import annotations

import os

import torch
import triton

from hf_attn_plugin import ops

SHAPES = {  # name: (B, Hq, Hkv, S, D, causal)
    "smollm2 D64 9/3": (8, 9, 3, 2048, 64, True),
    "bert D64 non-causal": (32, 12, 12, 512, 64, False),
    "llama3.2-1b D64 32/8 S1k": (16, 32, 8, 1024, 64, True),
    "llama3.2-1b D64 32/8 S4k": (4, 32, 8, 4096, 64, True),
    "heads D128 16/16 S2k": (8, 16, 16, 2048, 128, True),
    "llama3-8b D128 32/8 S1k": (16, 32, 8, 1024, 128, True),
    "llama3-8b D128 32/8 S4k": (4, 32, 8, 4096, 128, True),
}


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for name, (b, hq, hkv, s, d, causal) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for h in (hq, hkv, hkv))
        dout = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                ops.attention(q, k, v, causal=causal)

        def fwdbwd():
            ops.attention(q, k, v, causal=causal).backward(dout)

        times = {}
        for _ in range(3):
            for gluon in ("1", "0"):
                os.environ["HF_ATTN_PLUGIN_GLUON"] = gluon
                for mode, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                    times.setdefault((mode, gluon), []).append(triton.testing.do_bench(fn, warmup=25, rep=100))
        for mode in ("fwd", "fwdbwd"):
            on, off = sorted(times[(mode, "1")]), sorted(times[(mode, "0")])
            print(f"{name:28s} {mode:6s} gluon on {on[1]:.3f} ms (min {on[0]:.3f})  off {off[1]:.3f} ms "
                  f"(min {off[0]:.3f})  on/off {on[1] / off[1]:.2f}", flush=True)
    os.environ.pop("HF_ATTN_PLUGIN_GLUON", None)


if __name__ == "__main__":
    main()
