"""Single-stream ``generate()``: plugin vs eager vs sdpa, on the plain route and on transformers' compiled route.

One process, a ~1B Llama-style GQA model (hidden 2048, 16 layers, 32/8 heads, head_dim 64, bf16, random weights):

* ``dynamic``: plain ``generate()`` with the default dynamic cache (B=1, 512-token prompt + 256 new): new tokens
  per second (best of two) and the time of the process's first ``generate()`` call (compiles, no tuning);
* ``static``: ``cache_implementation="static"``, which transformers compiles itself (``CompileConfig(fullgraph=True)``:
  inductor with CUDA graphs): tokens per second after the compiling call, the compile call's time, and whether
  the tokens equal the same implementation's uncompiled run (bf16: near-ties may differ; ``agree`` is the fraction
  of equal tokens).

    python benchmarks/bench_generate.py --out DIR [--impls eager sdpa plugin] [--routes dynamic static]

Appends rows to ``DIR/generate_single_stream.csv`` (the README's "Single-stream generate()" table).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.configuration_utils import CompileConfig

import hf_attn_plugin  # noqa: F401  (registers "plugin")

FIELDS = ["gpu", "torch", "triton", "transformers", "date", "code", "route", "batch", "prompt", "new", "impl",
          "first_call_s", "compile_s", "tok_s"]


def build_model() -> torch.nn.Module:
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa", "plugin"])
    parser.add_argument("--routes", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256, help="new tokens on the dynamic route")
    parser.add_argument("--new-static", type=int, default=64, help="new tokens on the compiled static route")
    parser.add_argument("--code", default="this release", help="label of the code measured (CSV column)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                transformers=transformers.__version__, date=datetime.date.today().isoformat(), code=args.code)
    model = build_model()
    prompt = torch.randint(0, 32000, (1, args.prompt), device="cuda")
    rows = []
    for impl in args.impls:
        model.set_attn_implementation(impl)
        if "dynamic" in args.routes:
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
            first, _ = timed(lambda: model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False))
            best = min(timed(lambda: model.generate(prompt, **kw))[0] for _ in range(2))
            rows.append(dict(meta, route="generate(), dynamic cache", batch=1, prompt=args.prompt, new=args.new,
                             impl=impl, first_call_s=f"{first:.2f}", compile_s="", tok_s=f"{args.new / best:.1f}"))
            print(f"dynamic {impl}: first {first:.2f}s  tok/s {args.new / best:.1f}", flush=True)
        if "static" in args.routes and impl != "eager":
            torch._dynamo.reset()
            kw = dict(max_new_tokens=args.new_static, min_new_tokens=args.new_static, do_sample=False,
                      cache_implementation="static")
            compile_s, _ = timed(lambda: model.generate(prompt, **kw, compile_config=CompileConfig(fullgraph=True)))
            best, out = timed(lambda: model.generate(prompt, **kw, compile_config=CompileConfig(fullgraph=True)))
            plain = model.generate(prompt, **kw, disable_compile=True)
            agree = (out == plain).float().mean().item()
            rows.append(dict(meta, route="generate(), static cache compiled (CUDA graphs)", batch=1,
                             prompt=args.prompt, new=args.new_static, impl=impl, first_call_s="",
                             compile_s=f"{compile_s:.1f}", tok_s=f"{args.new_static / best:.1f}"))
            print(f"static-compiled {impl}: compile {compile_s:.1f}s tok/s {args.new_static / best:.1f} "
                  f"same-as-uncompiled {torch.equal(out, plain)} agree {agree:.3f}", flush=True)
    path = os.path.join(args.out, "generate_single_stream.csv")
    fresh = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if fresh:
            writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
