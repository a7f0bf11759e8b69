"""End-to-end continuous batching: ``generate_batch`` new tokens/s, our paged kernels vs transformers' sdpa path.

A ~1B Llama-style GQA model (hidden 2048, 16 layers, 32/8 heads, bf16, random weights), 128 requests with
prompts of 64-1023 tokens and 128 new greedy tokens each. All paths run in one process on the same weights:

* ``plugin``: :func:`hf_attn_plugin.generate_batch` with ``engine="transformers"`` (transformers' scheduler, our
  in-place paged attention);
* ``engine``: :func:`hf_attn_plugin.generate_batch` with ``engine="plugin"`` (our engine: our page allocator, varlen
  prefill, the decode step of the whole model in CUDA graphs; ``hf_attn_plugin/integration/engine.py``), its default
  ``EngineConfig`` (``+eager``: ``cuda_graphs=False``). Its rows add the decode steps' GPU busy fraction (graph time
  / wall time of the decode steps, host work included) and the mean wall time of a decode step;
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

Shared prompt prefixes (``--shared-prefix N``): every request is one shared ``N``-token system prompt followed by a
short question of its own (8-32 tokens). transformers' prefix sharing (on by default; ``+noshare``:
``allow_block_sharing=False``) hashes complete KV pages and lets later requests reference them instead of
prefilling and storing them again. Reported per run: time to finish, new tokens/s, tokens run through the model
(prefill + decode) and the peak KV pages the requests referenced at once (a shared page counts once) in pages and
MiB; rows are appended to ``generate_batch_shared_prefix.csv``. Default impls: ``plugin,plugin+noshare,sdpa,
sdpa+noshare``. ``--smoke`` runs a tiny fp32 model on the CPU (8 requests, 4 new tokens, 64-token prefix, pages
of 16) to check the script::

    python benchmarks/bench_generate_batch.py --shared-prefix 1024 --new-tokens 64
    python benchmarks/bench_generate_batch.py --shared-prefix 1024 --smoke --out /tmp/smoke

Sliding-window models (``--sliding-window W``): the same ~1B dimensions as a Qwen2-style model whose layers
alternate windowed (``W`` keys) and global attention, the usual prompts (64-1023 tokens). ``+fullkv`` runs it with
transformers' cache told every layer is global (the model still applies its windows: same tokens), i.e. the KV
memory of a full cache; for ``plugin`` only (sdpa takes its window from transformers' mask, which then has none).
Default impls: ``plugin,plugin+fullkv,sdpa``; rows (with peak KV MiB) appended to
``generate_batch_sliding_window.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import transformers
from common import append_rows, llama_1b, print_device, run_meta, timed, write_rows

import hf_attn_plugin
from hf_attn_plugin.integration import compat
from hf_attn_plugin.integration.engine import EngineConfig, cached_engine, release_engine


OPTIONS = {
    "graphs": {"use_cuda_graph": True}, "decodegraphs": {"use_cuda_graph": (False, True)},
    "async": {"use_async_batching": True}, "blocktable": {"max_blocks_per_request": 32},
    "noshare": {"allow_block_sharing": False},
    "fullkv": {},  # not a ContinuousBatchingConfig field: see run()
}
ENGINE_OPTIONS = {"eager": {"cuda_graphs": False}}  # options of the "engine" impl (EngineConfig fields)


def batching_config(spec: str, **common) -> tuple[str, transformers.ContinuousBatchingConfig | None]:
    """``"plugin+graphs+async"`` -> ``("plugin", ContinuousBatchingConfig(use_cuda_graph=True, use_async_batching=True))``
    (``common`` fields added; ``page_size`` under its name in the installed transformers)."""
    impl, *options = spec.split("+")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)} in {spec!r}; known: {', '.join(OPTIONS)}")
    fields = {k: v for option in options for k, v in OPTIONS[option].items()}
    fields.update(common)
    return impl, compat.continuous_batching_config(**fields) if fields else None


def run(model, spec: str, prompts: list[list[int]], new_tokens: int, **common) -> tuple[float, int, dict]:
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    if spec.split("+")[0] == "engine":
        return run_engine(model, spec, prompts, config, **common)
    impl, cb_config = batching_config(spec, **common)
    model.set_attn_implementation(impl)
    kwargs = {} if cb_config is None else {"continuous_batching_config": cb_config}
    with full_kv_cache(model) if "fullkv" in spec.split("+") else contextlib.nullcontext():
        if impl == "plugin":
            seconds, outputs = timed(lambda: hf_attn_plugin.generate_batch(model, prompts, generation_config=config,
                                                                            engine="transformers", **kwargs))
        else:
            seconds, outputs = timed(lambda: model.generate_batch(prompts, generation_config=config, **kwargs))
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return seconds, generated, outputs


def run_engine(model, spec: str, prompts: list[list[int]], config, page_size: int | None = None,
               max_batch_tokens: int | None = None, num_blocks: int | None = None) -> tuple[float, int, dict]:
    """``engine[+eager]``: our engine (``--page-size``, ``--max-batch-tokens`` and ``--num-blocks`` size it too)."""
    _, *options = spec.split("+")
    unknown = set(options) - set(ENGINE_OPTIONS)
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)} in {spec!r}; the engine knows: "
                         f"{', '.join(ENGINE_OPTIONS)}")
    fields = {k: v for option in options for k, v in ENGINE_OPTIONS[option].items()}
    for name, value in (("page_size", page_size), ("max_batch_tokens", max_batch_tokens), ("num_pages", num_blocks)):
        if value is not None:
            fields[name] = value
    model.set_attn_implementation("plugin")
    engine_config = EngineConfig(**fields)
    seconds, outputs = timed(lambda: hf_attn_plugin.generate_batch(model, prompts, generation_config=config,
                                                                    engine="plugin", engine_config=engine_config))
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return seconds, generated, outputs


def engine_row(model) -> dict:
    """The last engine run's decode steps: count, mean wall ms, GPU busy fraction (graphs only)."""
    eng = cached_engine(model)
    if eng is None or not eng.stats["decode_steps"]:
        return {}
    steps = eng.stats["decode_steps"]
    busy = eng.busy_fraction()
    return dict(decode_steps=steps, prefill_forwards=eng.stats["prefill_forwards"],
                decode_ms_per_step=round(eng.stats["decode_wall_ms"] / steps, 3),
                decode_gpu_busy=round(busy, 3) if busy is not None else "")


@contextlib.contextmanager
def full_kv_cache(model):
    """transformers' continuous-batching cache sees every layer as global (it reads ``config.layer_types`` when it
    is built), while the attention modules keep their windows: the same tokens, the memory of a full cache."""
    config = model.config
    saved = config.layer_types
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    try:
        yield
    finally:
        config.layer_types = saved


def windowed_1b(layers: int, window: int, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, **config):
    """:func:`common.llama_1b`'s dimensions (``config``: fields that differ) as a Qwen2 model whose layers alternate
    windowed (even layers, ``window`` keys) and global attention; random weights from seed 0."""
    fields = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                  use_sliding_window=True, sliding_window=window, max_window_layers=0,
                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    fields.update(config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**fields), dtype=dtype).to(device)


@contextlib.contextmanager
def kv_watch(model):
    """``{"peak_blocks", "peak_bytes", "model_tokens"}`` of the runs inside the block: the most KV blocks / bytes the
    requests referenced at once (:func:`hf_attn_plugin.integration.compat.kv_in_use`, sampled after each step is
    scheduled and its pages allocated) and the tokens run through the model (prefill + decode: its embedding's
    inputs)."""
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

    seen = {"peak_blocks": 0, "peak_bytes": 0, "model_tokens": 0}
    real = ContinuousBatchProcessor.prepare_next_batch

    def prepare_next_batch(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        blocks, nbytes = compat.kv_in_use(self.cache)
        if nbytes > seen["peak_bytes"]:
            seen["peak_blocks"], seen["peak_bytes"] = blocks, nbytes
        return result

    def count(module, args, output):
        seen["model_tokens"] += args[0].numel()

    ContinuousBatchProcessor.prepare_next_batch = prepare_next_batch
    hook = model.get_input_embeddings().register_forward_hook(count)
    try:
        yield seen
    finally:
        ContinuousBatchProcessor.prepare_next_batch = real
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a new "
                        "temporary folder)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--impls", default=None, help="comma-separated; a name may repeat (a second sample): plugin, "
                        "engine, sdpa (with options). Default plugin,engine,sdpa (--shared-prefix: "
                        "plugin,plugin+noshare,sdpa,sdpa+noshare; --sliding-window: plugin,plugin+fullkv,sdpa)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache pages for every run (default: "
                        "transformers sizes the cache from free memory)")
    parser.add_argument("--shared-prefix", type=int, default=0, help="N > 0: every request = one shared N-token "
                        "system prompt + a question of 8-32 tokens (see above)")
    parser.add_argument("--sliding-window", type=int, default=0, help="W > 0: a model alternating W-token windowed "
                        "and global layers (see above)")
    parser.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default: transformers', "
                        "256; --smoke: 16)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per step (default: "
                        "transformers', 8192 on a GPU; --smoke: 96)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 model on the CPU: check the script runs")
    args = parser.parse_args()
    shared, sliding = args.shared_prefix > 0, args.sliding_window > 0
    if shared and sliding:
        raise SystemExit("--shared-prefix and --sliding-window are separate tables: pass one of them")
    if args.smoke:
        import tempfile

        args.requests, args.new_tokens = min(args.requests, 8), min(args.new_tokens, 4)
        args.shared_prefix = min(args.shared_prefix, 64)
        args.page_size = args.page_size or 16
        args.max_batch_tokens = args.max_batch_tokens or 96  # a few requests per prefill step, as on the GPU
        args.out = args.out or tempfile.mkdtemp(prefix="bench_generate_batch_")
    args.out = args.out or "benchmarks/results"
    args.impls = args.impls or ("plugin,plugin+noshare,sdpa,sdpa+noshare" if shared else
                                "plugin,plugin+fullkv,sdpa" if sliding else "plugin,engine,sdpa")
    common = {} if args.num_blocks is None else {"num_blocks": args.num_blocks}
    if args.page_size is not None:
        common["page_size"] = args.page_size
    if args.max_batch_tokens is not None:
        common["max_batch_tokens"] = args.max_batch_tokens

    os.makedirs(args.out, exist_ok=True)
    print_device()
    tiny = dict(device="cpu", dtype=torch.float32, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2) if args.smoke else {}
    if sliding:
        model = windowed_1b(2 if args.smoke else args.layers, args.sliding_window, **tiny).eval()
    else:
        model = llama_1b(2 if args.smoke else args.layers, **tiny).eval()
    generator = torch.Generator().manual_seed(0)
    if shared:
        system = torch.randint(1, 32000, (args.shared_prefix,), generator=generator).tolist()
        lengths = torch.randint(8, 33, (args.requests,), generator=generator).tolist()
        prompts = [system + torch.randint(1, 32000, (n,), generator=generator).tolist() for n in lengths]
    else:
        lengths = torch.randint(64, 1024, (args.requests,), generator=generator).tolist()
        prompts = [torch.randint(1, 32000, (n,), generator=generator).tolist() for n in lengths]
    warm = [p[:64] for p in prompts[:4]]

    rows, tokens = [], {}
    for impl in args.impls.split(","):
        try:
            run(model, impl, warm, 4, **common)  # compile/warm the kernels outside the timing
            with kv_watch(model) if shared or sliding else contextlib.nullcontext() as seen:
                seconds, generated, outputs = run(model, impl, prompts, args.new_tokens, **common)
        except Exception as error:  # one failing path must not hide the other's numbers
            print(f"{impl:8s} FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
            continue
        tokens[impl] = {rid: list(o.generated_tokens) for rid, o in outputs.items()}
        rate = generated / seconds
        row = dict(
            run_meta("gpu", "torch", "transformers", "date"), impl=impl, num_blocks=args.num_blocks or "auto",
            requests=args.requests, new_tokens=args.new_tokens,
            generated=generated, seconds=round(seconds, 2), new_tokens_per_s=round(rate, 1),
        )
        line = f"{impl:8s} {generated} new tokens in {seconds:.1f}s: {rate:.0f} tokens/s"
        if impl.split("+")[0] == "engine":
            row.update(engine_row(model))
            if "decode_steps" in row:
                line += (f"; {row['decode_steps']} decode steps of {row['decode_ms_per_step']} ms, GPU busy "
                         f"{row['decode_gpu_busy'] or 'n/a'}")
            release_engine(model)  # its pool must not shrink the next implementation's memory
        if shared:
            page = args.page_size or 256
            row.update(sharing="noshare" not in impl.split("+"), max_batch_tokens=args.max_batch_tokens or "auto",
                       prefix_tokens=args.shared_prefix,
                       question_tokens=round(sum(lengths) / len(lengths), 1), page_size=page,
                       model_tokens=seen["model_tokens"], peak_kv_pages=seen["peak_blocks"],
                       peak_kv_mib=round(seen["peak_bytes"] / 2**20, 2))
            line += (f"; {seen['model_tokens']} tokens through the model, peak KV {seen['peak_blocks']} pages = "
                     f"{row['peak_kv_mib']} MiB")
        if sliding:
            row.update(sliding_window=args.sliding_window, full_kv="fullkv" in impl.split("+"),
                       page_size=args.page_size or 256, peak_kv_mib=round(seen["peak_bytes"] / 2**20, 2))
            line += f"; peak KV {row['peak_kv_mib']} MiB"
        rows.append(row)
        print(line, flush=True)
        if not (shared or sliding):
            write_csv(os.path.join(args.out, "generate_batch.csv"), rows)  # after every row: a timeout keeps data
    for y in tokens:
        x = "plugin"
        if x in tokens and y != x:
            a, b = tokens[x], tokens[y]
            same = sum(a[r] == b.get(r) for r in a)
            print(f"requests with identical greedy tokens ({model.dtype}, {x} vs {y}): {same}/{len(a)}", flush=True)
            for row in rows:
                if row["impl"] == y:
                    row[f"identical_vs_{x}"] = f"{same}/{len(a)}"
    if shared or sliding:
        path = os.path.join(args.out, "generate_batch_shared_prefix.csv" if shared else
                            "generate_batch_sliding_window.csv")
        fields = [*rows[0], "identical_vs_plugin"] if rows else None
        append_rows(path, rows, fields)
        print(f"appended {len(rows)} rows to {path}", flush=True)
    else:
        write_csv(os.path.join(args.out, "generate_batch.csv"), rows)


def write_csv(path: str, rows: list[dict]) -> None:
    if rows:
        write_rows(path, rows)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
