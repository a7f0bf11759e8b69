"""Model-level training throughput: a ~1B Llama-style GQA model, "plugin" vs "sdpa" vs "flex_attention".

One training step = forward + backward with ``use_cache=False`` (what Trainer does), bf16, random weights,
16k tokens either as one sequence or packed as 16 documents (``position_ids`` restarts, no attention mask).
All implementations run in one process, on the same model weights, timed with CUDA events.

    python benchmarks/bench_model.py --out DIR [--layers 16] [--tokens 16384] [--docs 16]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from common import event_ms, llama_1b, print_device, run_meta, write_rows

import hf_attn_plugin  # noqa: F401  (registers "plugin")


def batch_for(tokens: int, docs: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (1, tokens), device="cuda")
    doc_len = tokens // docs
    position_ids = (torch.arange(tokens, device="cuda") % doc_len)[None] if docs > 1 else None
    batch = {"input_ids": ids, "labels": ids}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


def time_steps(model, batch, steps: int, warmup: int) -> float:
    """Median milliseconds of one forward+backward step."""
    times = []
    for i in range(warmup + steps):
        ms = event_ms(lambda: model(**batch).loss.backward())
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(ms)
        print(f"    step {i}: {ms:.1f} ms{' (warm-up)' if i < warmup else ''}", flush=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", default="plugin,sdpa,flex_attention")
    parser.add_argument("--layouts", default="packed,one_sequence", help="packed and/or one_sequence, in this order")
    parser.add_argument("--csv", default="model_training.csv", help="file name under --out")
    args = parser.parse_args()

    torch._dynamo.config.cache_size_limit = 64  # flex attention recompiles per mask shape
    os.makedirs(args.out, exist_ok=True)
    print_device()
    model = llama_1b(args.layers, max_position_embeddings=32768, use_cache=False)
    model.gradient_checkpointing_disable()
    meta = dict(run_meta("gpu", "torch", "transformers", "date"), layers=args.layers, tokens=args.tokens)
    rows = []
    for layout in args.layouts.split(","):
        docs = {"packed": args.docs, "one_sequence": 1}[layout]
        batch = batch_for(args.tokens, docs, model.config.vocab_size)
        for impl in args.impls.split(","):
            model.set_attn_implementation(impl)
            try:
                ms = time_steps(model, batch, args.steps, args.warmup)
            except Exception as error:  # report and continue: one failing anchor must not hide the others
                print(f"{layout:12s} {impl:15s} FAILED: {type(error).__name__}: {str(error)[:200]}")
                continue
            tokens_per_s = args.tokens / (ms / 1e3)
            rows.append(dict(meta, layout=layout, docs=docs, impl=impl, ms=round(ms, 3), tokens_per_s=round(tokens_per_s)))
            print(f"{layout:12s} {impl:15s} {ms:9.1f} ms/step {tokens_per_s:10.0f} tokens/s", flush=True)
            write_rows(os.path.join(args.out, args.csv), rows)  # after every row: a timeout keeps data


if __name__ == "__main__":
    main()
