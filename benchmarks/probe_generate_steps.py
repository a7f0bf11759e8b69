"""Where does single-stream ``generate()`` spend its time with "plugin"? (issue 17 items 1 and 2.)

The ~1B model of ``bench_generate.py``, B=1, 512-token prompt, one process:

1. plain route: every decode step clocked (a stopping criterion synchronises at each step) for eager, sdpa, plugin
   and plugin with its decode route off (``HF_ATTN_PLUGIN_DECODE=0``), after a warm-up, in alternating orders:
   the median step and the mean step per window of 64 steps (does a step get slower as the cache grows?);
2. a cProfile of one plugin ``generate()`` (top functions by own time);
3. compiled static route (``cache_implementation="static"``): per-step clocks for sdpa and plugin, dynamo's
   recompile/graph-break counters and inductor's CUDA-graph skip messages.

    python benchmarks/probe_generate_steps.py [--new 256]
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
    return clock.steps_ms()


def summary(steps):
    windows = [statistics.mean(steps[i:i + 64]) for i in range(0, len(steps), 64)]
    return (f"median {statistics.median(steps):.2f} ms, worst {max(steps):.2f} at step {steps.index(max(steps))}, "
            f"per 64-step window {' '.join(f'{w:.2f}' for w in windows)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--static-new", type=int, default=64)
    args = parser.parse_args()
    print_device()
    torch._dynamo.config.cache_size_limit = 64
    model = build_model()
    prompt = torch.randint(0, 32000, (1, 512), device="cuda")
    impls = ["eager", "sdpa", "plugin", "plugin_nodecode"]
    for impl in impls:
        run(model, prompt, impl, 16)
    t0 = time.time()
    while time.time() - t0 < 20:  # clocks up
        run(model, prompt, "eager", 64)
    best = {}
    for order in (impls, impls[::-1]):
        for impl in order:
            steps = run(model, prompt, impl, args.new)
            print(f"dynamic {impl}: {summary(steps)}", flush=True)
            best[impl] = min(best.get(impl, 1e9), statistics.median(steps))
    print("dynamic medians (ms/step):", {k: round(v, 2) for k, v in best.items()}, flush=True)

    profiler = cProfile.Profile()
    os.environ["HF_ATTN_PLUGIN_DECODE"] = "1"
    model.set_attn_implementation("plugin")
    profiler.enable()
    model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    print(text.getvalue()[:9000], flush=True)

    torch._logging.set_logs(perf_hints=True, recompiles=True, graph_breaks=True)
    logging.getLogger("torch._inductor").setLevel(logging.WARNING)
    for impl in ("sdpa", "plugin"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        kw = dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
        start = time.perf_counter()
        run(model, prompt, impl, args.static_new, **kw)
        compile_s = time.perf_counter() - start
        steps = min((run(model, prompt, impl, args.static_new, **kw) for _ in range(3)),
                    key=statistics.median)
        counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if v}
        print(f"static {impl}: compile {compile_s:.1f} s; {summary(steps)}", flush=True)
        print(f"static {impl} counters: {counters}", flush=True)


if __name__ == "__main__":
    main()
