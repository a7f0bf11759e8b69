#!/usr/bin/env python
"""Cold start: the first ``generate()`` of a fresh process, and the worst step of a long generation (issue #15).

Each implementation runs in its own fresh Python process, twice: with Triton's on-disk kernel cache as the machine has
it (``warm``: a user's second and later runs) and with an empty one (``cold``: the first run after installing, every
kernel compiled). Model: the ~1B
Llama-style GQA model of ``bench_generate.py`` (bf16, random weights; building it is not timed). In that process:

1. ``first_call_s``: ``generate()`` of 8 new tokens after a 512-token prompt — the first call of the process;
2. a ``--new``-token generation (default 2048) from the same prompt, timed per decode step (a stopping criterion
   synchronises and reads the clock at every step): median step, worst step (the prefill excluded), their ratio and
   where the worst step happened. New lengths keep appearing during it: a launch config tuned or a kernel compiled
   mid-run would show here as a step far above the median (target: no step above 3x the median).

    python benchmarks/bench_cold_start.py --out DIR [--impls eager sdpa plugin] [--new 2048]

Appends to ``DIR/cold_start.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import append_rows, run_meta

FIELDS = ["gpu", "torch", "triton", "transformers", "date", "impl", "triton_cache", "prompt", "first_call_new",
          "first_call_s", "new", "median_step_ms", "worst_step_ms", "worst_over_median", "worst_step"]


def child(impl: str, prompt_len: int, new: int) -> dict:
    import torch
    import transformers

    import hf_attn_plugin  # noqa: F401  (registers "plugin")
    from bench_generate import StepClock, build_model

    model = build_model()
    model.set_attn_implementation(impl)
    prompt = torch.randint(0, 32000, (1, prompt_len), device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    clock = StepClock().start()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   stopping_criteria=transformers.StoppingCriteriaList([clock]))
    steps = clock.steps_ms()
    median = statistics.median(steps)
    worst = max(range(len(steps)), key=steps.__getitem__)
    return dict(run_meta("gpu", "torch", "triton", "transformers", "date"), impl=impl, prompt=prompt_len,
                first_call_new=8, first_call_s=round(first, 3), new=new,
                median_step_ms=round(median, 3), worst_step_ms=round(steps[worst], 3),
                worst_over_median=round(steps[worst] / median, 2), worst_step=worst + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for cold_start.csv")
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa", "plugin"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=2048)
    parser.add_argument("--caches", nargs="+", default=["warm", "cold"], choices=["warm", "cold"],
                        help="Triton's on-disk cache: as the machine has it, and/or a fresh empty one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.prompt, args.new)), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cold_start.csv")
    for impl, cache in [(impl, cache) for cache in args.caches for impl in args.impls]:
        env = dict(os.environ)
        if cache == "cold":
            env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--out", args.out, "--child", impl,
                               "--prompt", str(args.prompt), "--new", str(args.new)],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"FAILED {impl} (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = dict(json.loads(lines[-1][len("RESULT "):]), triton_cache=cache)
        append_rows(path, [row], FIELDS)
        print(f"{impl:7s} {cache} Triton cache: first call {row['first_call_s']:.2f} s; {args.new} steps: "
              f"median {row['median_step_ms']:.2f} ms, worst {row['worst_step_ms']:.2f} ms "
              f"({row['worst_over_median']:.1f}x, step {row['worst_step']})",
              flush=True)


if __name__ == "__main__":
    main()
