"""End-to-end continuous batching: ``generate_batch`` new tokens/s, our paged kernels vs transformers' sdpa path.

A ~1B Llama-style GQA model (hidden 2048, 16 layers, 32/8 heads, bf16, random weights), 128 requests with
prompts of 64-1023 tokens and 128 new greedy tokens each. Both paths run in one process on the same weights:

* ``plugin``: :func:`hf_attn_plugin.generate_batch` (transformers' scheduler, our in-place paged attention);
* ``sdpa``: ``model.generate_batch`` with ``attn_implementation="sdpa"`` (transformers' own paged path).

An implementation name may carry ``ContinuousBatchingConfig`` options, e.g. ``plugin+blocktable+decodegraphs``:

    +graphs        use_cuda_graph=True           (every step captured, shapes padded)
    +decodegraphs  use_cuda_graph=(False, True)  (block-table decode steps captured: use with +blocktable)
    +async         use_async_batching=True
    +blocktable    max_blocks_per_request=32     (decode-only steps read transformers' block table)

Without options, transformers' defaults for a non-flash attention: no graphs, no async batching, no
block-table decode path. ``--num-blocks`` sizes the KV cache (pages) for every run; by default
transformers sizes it from free memory, and its CUDA-graph warm-up runs one step that attends over the
whole cache.

    python benchmarks/bench_generate_batch.py --out DIR [--requests 128] [--new-tokens 128] [--impls plugin,sdpa]
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers
from common import llama_1b, print_device, run_meta, timed, write_rows

import hf_attn_plugin


OPTIONS = {
    "graphs": {"use_cuda_graph": True}, "decodegraphs": {"use_cuda_graph": (False, True)},
    "async": {"use_async_batching": True}, "blocktable": {"max_blocks_per_request": 32},
}


def batching_config(spec: str, **common) -> tuple[str, transformers.ContinuousBatchingConfig | None]:
    """``"plugin+graphs+async"`` -> ``("plugin", ContinuousBatchingConfig(use_cuda_graph=True, use_async_batching=True))``."""
    impl, *options = spec.split("+")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)} in {spec!r}; known: {', '.join(OPTIONS)}")
    fields = {k: v for option in options for k, v in OPTIONS[option].items()}
    fields.update(common)
    return impl, transformers.ContinuousBatchingConfig(**fields) if fields else None


def run(model, spec: str, prompts: list[list[int]], new_tokens: int, **common) -> tuple[float, int, dict]:
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    impl, cb_config = batching_config(spec, **common)
    model.set_attn_implementation(impl)
    kwargs = {} if cb_config is None else {"continuous_batching_config": cb_config}
    if impl == "plugin":
        seconds, outputs = timed(lambda: hf_attn_plugin.generate_batch(model, prompts, generation_config=config,
                                                                        **kwargs))
    else:
        seconds, outputs = timed(lambda: model.generate_batch(prompts, generation_config=config, **kwargs))
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return seconds, generated, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--impls", default="plugin,sdpa", help="comma-separated; a name may repeat (a second sample)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache pages for every run (default: "
                        "transformers sizes the cache from free memory)")
    args = parser.parse_args()
    common = {} if args.num_blocks is None else {"num_blocks": args.num_blocks}

    os.makedirs(args.out, exist_ok=True)
    print_device()
    model = llama_1b(args.layers).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 1024, (args.requests,), generator=generator).tolist()
    prompts = [torch.randint(1, 32000, (n,), generator=generator).tolist() for n in lengths]
    warm = [p[:64] for p in prompts[:4]]

    rows, tokens = [], {}
    for impl in args.impls.split(","):
        try:
            run(model, impl, warm, 4, **common)  # compile/warm the kernels outside the timing
            seconds, generated, outputs = run(model, impl, prompts, args.new_tokens, **common)
        except Exception as error:  # one failing path must not hide the other's numbers
            print(f"{impl:8s} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        tokens[impl] = {rid: list(o.generated_tokens) for rid, o in outputs.items()}
        rate = generated / seconds
        rows.append(dict(
            run_meta("gpu", "torch", "transformers", "date"), impl=impl, num_blocks=args.num_blocks or "auto",
            requests=args.requests, new_tokens=args.new_tokens,
            generated=generated, seconds=round(seconds, 2), new_tokens_per_s=round(rate, 1),
        ))
        print(f"{impl:8s} {generated} new tokens in {seconds:.1f}s: {rate:.0f} tokens/s", flush=True)
        write_csv(os.path.join(args.out, "generate_batch.csv"), rows)  # after every row: a timeout keeps data
    for y in tokens:
        x = "plugin"
        if x in tokens and y != x:
            a, b = tokens[x], tokens[y]
            same = sum(a[r] == b.get(r) for r in a)
            print(f"requests with identical greedy tokens (bf16, {x} vs {y}): {same}/{len(a)}", flush=True)
            for row in rows:
                if row["impl"] == y:
                    row[f"identical_vs_{x}"] = f"{same}/{len(a)}"
    write_csv(os.path.join(args.out, "generate_batch.csv"), rows)


def write_csv(path: str, rows: list[dict]) -> None:
    if rows:
        write_rows(path, rows)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
