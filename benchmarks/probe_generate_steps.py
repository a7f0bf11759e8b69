"""Where does single-stream ``generate()`` spend its time with "plugin"? (issue 17 items 1 and 2.)

The ~1B model of ``bench_generate.py``, B=1 (``--batch``: rows of random prompts, no padding), 512-token prompt, one
process:

1. plain route: every decode step clocked (a stopping criterion synchronises at each step) for eager, sdpa, plugin
   and plugin with its decode route off (``HF_ATTN_PLUGIN_DECODE=0``), after a warm-up, in alternating orders:
   the median step and the mean step per window of 64 steps (does a step get slower as the cache grows?);
2. a cProfile of one ``generate()`` per impl of ``--profile`` (top functions by own time);
3. compiled static route (``cache_implementation="static"``): per-step clocks for sdpa and plugin (and the prefill's
   time), dynamo's recompile/graph-break counters and inductor's CUDA-graph skip messages.

    python benchmarks/probe_generate_steps.py [--new 256] [--batch 16] [--impls sdpa plugin] [--profile sdpa plugin]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import statistics
import time

import torch
import transformers
from bench_generate import StepClock, build_model
from common import print_device
from transformers.generation.configuration_utils import CompileConfig

import hf_attn_plugin  # noqa: F401  (registers "plugin")


def run(model, prompt, impl, new, **kw):
    decode_off = impl == "plugin_nodecode"
    os.environ["HF_ATTN_PLUGIN_DECODE"] = "0" if decode_off else "1"
    model.set_attn_implementation("plugin" if decode_off else impl)
    clock = StepClock().start()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   stopping_criteria=transformers.StoppingCriteriaList([clock]), **kw)
    return clock.steps_ms(), (clock.times[1] - clock.times[0]) * 1e3


def summary(steps):
    windows = [statistics.mean(steps[i:i + 64]) for i in range(0, len(steps), 64)]
    return (f"median {statistics.median(steps):.2f} ms, worst {max(steps):.2f} at step {steps.index(max(steps))}, "
            f"per 64-step window {' '.join(f'{w:.2f}' for w in windows)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--static-new", type=int, default=64, help="new tokens on the compiled route (0: skip it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa", "plugin", "plugin_nodecode"])
    parser.add_argument("--profile", nargs="*", default=["plugin"], help="impls to cProfile on the plain route")
    args = parser.parse_args()
    print_device()
    torch._dynamo.config.cache_size_limit = 64
    model = build_model()
    prompt = torch.randint(0, 32000, (args.batch, 512), device="cuda")
    impls = args.impls
    for impl in impls:
        run(model, prompt, impl, 16)
    t0 = time.time()
    while time.time() - t0 < 20:  # clocks up
        run(model, prompt, impls[0], 64)
    best = {}
    for order in (impls, impls[::-1]):
        for impl in order:
            steps, prefill = run(model, prompt, impl, args.new)
            print(f"dynamic B={args.batch} {impl}: prefill {prefill:.1f} ms; {summary(steps)}", flush=True)
            best[impl] = min(best.get(impl, 1e9), statistics.median(steps))
    print("dynamic medians (ms/step):", {k: round(v, 2) for k, v in best.items()}, flush=True)

    os.environ["HF_ATTN_PLUGIN_DECODE"] = "1"
    for impl in args.profile:
        profiler = cProfile.Profile()
        model.set_attn_implementation(impl)
        profiler.enable()
        model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(f"cProfile {impl} B={args.batch}:\n{text.getvalue()[:7000]}", flush=True)

    torch._logging.set_logs(perf_hints=True, recompiles=True, graph_breaks=True)
    logging.getLogger("torch._inductor").setLevel(logging.WARNING)
    for impl in [i for i in ("sdpa", "plugin") if i in impls and args.static_new]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        kw = dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
        start = time.perf_counter()
        run(model, prompt, impl, args.static_new, **kw)
        compile_s = time.perf_counter() - start
        steps, prefill = min((run(model, prompt, impl, args.static_new, **kw) for _ in range(3)),
                             key=lambda r: statistics.median(r[0]))
        counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}
        print(f"static B={args.batch} {impl}: compile {compile_s:.1f} s; prefill {prefill:.1f} ms; {summary(steps)}",
              flush=True)
        print(f"static {impl} counters: {counters}", flush=True)


if __name__ == "__main__":
    main()
