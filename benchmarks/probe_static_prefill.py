"""Why is "plugin"'s prefill slower on transformers' static-cache route? (issue 17 item 2; NOTES_decode.md, third
session of 2026-12-02.)

On the compiled static route the decode steps of "plugin" and sdpa are at parity (B=16: 3.73 vs 3.79 ms median
step), but the prefill is not: 63.0 vs 48.8 ms at B=16 and 25.0 vs 16.0 ms at B=1 (512-token prompt, 64 new, so
the static cache has 576 slots), while on the plain dynamic route the two prefills are within 0-3 ms. The static
prefill hands the attention a key mask (the cache's unwritten tail), which "plugin" turns into segments.

This probe times the prefill alone, on both routes and for both impls: ``generate()`` with a stopping criterion
that ends it after the first token (the cache is still sized for ``--new`` tokens), best of ``--repeats``. It then
runs one more prefill per case under ``torch.profiler`` and prints the top ops by self CPU time and by device time,
and the calls that wait for the device (``aten::item``, ``aten::_local_scalar_dense``, ``cudaStreamSynchronize``,
``cudaMemcpyAsync``):

    python benchmarks/probe_static_prefill.py [--batch 1 16] [--prompt 512] [--new 64]

``--tiny --device cpu`` runs a 4-layer model on the CPU (HF_ATTN_PLUGIN_BACKEND=reference: the checks of this
script, not a measurement).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from common import llama_1b, print_device

import hf_attn_plugin  # noqa: F401  (registers "plugin")

WAITS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpyAsync")


class FirstToken(transformers.StoppingCriteria):
    """Ends generate() after its first token: what ran is the prefill (and one sampling step)."""

    def __call__(self, input_ids, scores, **kwargs):
        return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, prompt, cache: str, new: int):
    kw = dict(max_new_tokens=new, do_sample=False, stopping_criteria=transformers.StoppingCriteriaList([FirstToken()]))
    if cache == "static":
        kw.update(cache_implementation="static", disable_compile=True)  # the compiled route's prefill is not compiled
    return model.generate(prompt, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64, help="the new tokens the cache is sized for")
    parser.add_argument("--impls", nargs="+", default=["sdpa", "plugin"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model (checks of this script on a CPU)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also N prefills per case under cProfile: the top functions by own time (host time "
                             "the op-level profiler does not see: Python between ops, Triton's launch path)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print_device()
    if args.tiny:
        model = llama_1b(4, device=args.device, dtype=torch.float32, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    else:
        model = llama_1b(16, intermediate_size=8192, max_position_embeddings=8192).eval()
    model.eval()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for batch in args.batch:
        prompt = torch.randint(0, model.config.vocab_size, (batch, args.prompt), device=device)
        for impl in args.impls:
            model.set_attn_implementation(impl)
            for cache in ("dynamic", "static"):
                prefill(model, prompt, cache, args.new)  # compiles, warms
                times = []
                for _ in range(args.repeats):
                    sync(device)
                    start = time.perf_counter()
                    prefill(model, prompt, cache, args.new)
                    sync(device)
                    times.append((time.perf_counter() - start) * 1e3)
                print(f"\n=== B={batch} {impl} {cache}: prefill {min(times):.2f} ms (best of {args.repeats}; "
                      f"all {' '.join(f'{t:.1f}' for t in times)})", flush=True)
                with profile(activities=activities) as prof:
                    prefill(model, prompt, cache, args.new)
                    sync(device)
                if args.cprofile:
                    import cProfile
                    import pstats

                    sync(device)
                    host = cProfile.Profile()
                    host.enable()
                    for _ in range(args.cprofile):
                        prefill(model, prompt, cache, args.new)
                    sync(device)
                    host.disable()
                    print(f"--- cProfile, {args.cprofile} prefills (totals) ---")
                    pstats.Stats(host).sort_stats("tottime").print_stats(22)
                    pstats.Stats(host).sort_stats("cumulative").print_stats(r"hf_attn_plugin|sdpa_attention|triton", 14)
                events = prof.key_averages()
                waits = {e.key: e.count for e in events if e.key in WAITS}
                print(f"waits on the device: {waits}")
                print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
                if device.type == "cuda":
                    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
