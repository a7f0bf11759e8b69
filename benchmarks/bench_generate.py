"""Single-stream ``generate()``: plugin vs eager vs sdpa, on the plain route and on transformers' compiled route.

One process, a ~1B Llama-style GQA model (hidden 2048, 16 layers, 32/8 heads, head_dim 64, bf16, random weights):

* ``dynamic``: plain ``generate()`` with the default dynamic cache (B=1, 512-token prompt + 256 new): new tokens
  per second (all rows of the batch: ``batch * new / time``; after a warm-up, the impls timed three times in
  alternating orders, best of three each) and the time of each impl's first ``generate()`` call of the process
  (compiles, no tuning; the first impl also pays the process's CUDA start-up);
* ``static``: ``cache_implementation="static"``, which transformers compiles itself (``CompileConfig(fullgraph=True)``:
  inductor with CUDA graphs): tokens per second after the compiling call (best of three), the compile call's time, and whether
  the tokens equal the same implementation's uncompiled run (bf16: near-ties may differ; ``agree`` is the fraction
  of equal tokens).

    python benchmarks/bench_generate.py --out DIR [--impls eager sdpa plugin] [--routes dynamic static] [--batch 1 16]

``--batch``: batch sizes (rows of random prompts of one length, no padding; default 1). ``plugin_paged`` (dynamic route
only): "plugin" over ``hf_attn_plugin.PagedCache`` (pages read in place by the paged kernels). Long context:
``--prompt 32768 --impls sdpa plugin plugin_paged --routes dynamic``. "plugin" runs its decode steps
through ``hf_attn_plugin.decode_ops`` on both routes (the custom op ``hf_attn_plugin::decode_attention`` inside the
compiled graph).

Appends rows to ``DIR/generate_single_stream.csv`` (the README's "Single-stream generate()" table).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import transformers
from common import append_rows, llama_1b, print_device, run_meta, timed
from transformers.generation.configuration_utils import CompileConfig

import hf_attn_plugin  # noqa: F401  (registers "plugin")

FIELDS = ["gpu", "torch", "triton", "transformers", "date", "code", "route", "batch", "prompt", "new", "impl",
          "first_call_s", "compile_s", "tok_s"]


def attn_name(impl: str) -> str:
    """``plugin_paged`` is "plugin" over our paged cache (``hf_attn_plugin.PagedCache``) instead of the dynamic one."""
    return "plugin" if impl == "plugin_paged" else impl


def cache_kwargs(model, impl: str, batch: int) -> dict:
    """``past_key_values`` for ``plugin_paged`` (a fresh cache per call, sized for the longest run), else nothing."""
    if impl != "plugin_paged":
        return {}
    return dict(past_key_values=hf_attn_plugin.PagedCache(model, batch, memory_gib=_PAGED_GIB))


_PAGED_GIB = 4.0  # all layers' K and V: 16 layers x 8 heads x 64 x 2 x 2 bytes = 32 KiB a token, ~130k tokens


class StepClock(transformers.StoppingCriteria):
    """A stopping criterion that never stops: it synchronises and reads the clock at every step of ``generate()``
    (call :meth:`start` just before it). :meth:`steps_ms`: the decode steps' times, the prefill excluded."""

    def __init__(self):
        self.times = []

    def start(self) -> "StepClock":
        torch.cuda.synchronize()
        self.times = [time.perf_counter()]
        return self

    def __call__(self, input_ids, scores, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steps_ms(self) -> list:
        return [(b - a) * 1e3 for a, b in zip(self.times[1:], self.times[2:])]  # times[1]: the prefill's end


def build_model() -> torch.nn.Module:
    return llama_1b(16, intermediate_size=8192, max_position_embeddings=8192).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa", "plugin"])
    parser.add_argument("--routes", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256, help="new tokens on the dynamic route")
    parser.add_argument("--new-static", type=int, default=64, help="new tokens on the compiled static route")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--code", default="this release", help="label of the code measured (CSV column)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    print_device()
    meta = dict(run_meta("gpu", "torch", "triton", "transformers", "date"), code=args.code)
    model = build_model()
    path = os.path.join(args.out, "generate_single_stream.csv")
    rows = []
    for batch in args.batch:
        prompt = torch.randint(0, 32000, (batch, args.prompt), device="cuda")
        if "dynamic" in args.routes:
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
            first = {}
            for impl in args.impls:
                model.set_attn_implementation(attn_name(impl))
                first[impl], _ = timed(lambda: model.generate(prompt, max_new_tokens=8, min_new_tokens=8,
                                                              do_sample=False, **cache_kwargs(model, impl, batch)))
            # The H200's clocks (and this host's) take tens of seconds to ramp up: the first impl timed in a cold
            # process ran 1.6x slower than the same impl later (session 8's probe_b1_host.py). Warm up, then time
            # the impls in alternating orders and keep each one's best.
            model.set_attn_implementation(attn_name(args.impls[0]))
            for _ in range(3):
                model.generate(prompt, **kw, **cache_kwargs(model, args.impls[0], batch))
            best = dict.fromkeys(args.impls, float("inf"))
            for order in (args.impls, args.impls[::-1], args.impls):
                for impl in order:
                    model.set_attn_implementation(attn_name(impl))
                    extra = cache_kwargs(model, impl, batch)
                    best[impl] = min(best[impl], timed(lambda: model.generate(prompt, **kw, **extra))[0])
            for impl in args.impls:
                tok_s = batch * args.new / best[impl]
                route = "generate(), PagedCache" if impl == "plugin_paged" else "generate(), dynamic cache"
                rows.append(dict(meta, route=route, batch=batch, prompt=args.prompt,
                                 new=args.new, impl=impl, first_call_s=f"{first[impl]:.2f}", compile_s="",
                                 tok_s=f"{tok_s:.1f}"))
                append_rows(path, rows[-1:], FIELDS)  # as we go: a run cut short keeps what it measured
                print(f"dynamic B={batch} {impl}: first {first[impl]:.2f}s  tok/s {tok_s:.1f}", flush=True)
        for impl in args.impls:
            if "static" in args.routes and impl != "plugin_paged":
                model.set_attn_implementation(impl)
                torch._dynamo.reset()
                kw = dict(max_new_tokens=args.new_static, min_new_tokens=args.new_static, do_sample=False,
                          cache_implementation="static")
                config = CompileConfig(fullgraph=True)
                compile_s, _ = timed(lambda: model.generate(prompt, **kw, compile_config=config))
                best, out = min((timed(lambda: model.generate(prompt, **kw, compile_config=config))
                                 for _ in range(3)), key=lambda r: r[0])
                plain = model.generate(prompt, **kw, disable_compile=True)
                agree = (out == plain).float().mean().item()
                tok_s = batch * args.new_static / best
                rows.append(dict(meta, route="generate(), static cache compiled (CUDA graphs)", batch=batch,
                                 prompt=args.prompt, new=args.new_static, impl=impl, first_call_s="",
                                 compile_s=f"{compile_s:.1f}", tok_s=f"{tok_s:.1f}"))
                append_rows(path, rows[-1:], FIELDS)
                print(f"static-compiled B={batch} {impl}: compile {compile_s:.1f}s tok/s {tok_s:.1f} "
                      f"same-as-uncompiled {torch.equal(out, plain)} agree {agree:.3f}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
