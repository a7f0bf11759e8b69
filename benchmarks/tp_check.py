#!/usr/bin/env python
"""``attn_implementation="plugin"`` under transformers' own tensor parallelism (``tp_plan="auto"``).

One command, two processes; each holds half of every layer's attention heads (q/k/v projections colwise,
o_proj rowwise) and the MLP, so the attention function is called with the rank's local heads only::

    torchrun --nproc_per_node 2 benchmarks/tp_check.py --out DIR                 # GPU: ~1B Llama-style GQA, bf16
    torchrun --nproc_per_node 2 benchmarks/tp_check.py --device cpu --tiny --out DIR   # CPU smoke test (gloo)

Rank 0 first builds the model from a config with random weights (seed 0) and saves it to ``--model-dir``
(default ``DIR/model-llama`` etc.; no network needed), then every implementation (``--impls``, default plugin, sdpa,
eager) is loaded from that directory with the same plan and runs, on identical inputs:

* one forward over the prompt: last-position logits, compared with sdpa's. The eager-vs-sdpa difference is the
  noise floor of the dtype;
* greedy ``generate()`` for each ``--batches`` entry (untimed warm-up, then timed): tokens compared with sdpa's,
  tokens/s reported.

Checks (exit status 1 if any fails, printed by rank 0): the attention function receives plain local tensors
(not DTensors) holding ``heads / world_size`` query and KV heads (all heads where the plan leaves attention
whole); "plugin" tokens equal sdpa's, or, when they differ (bf16), its logit difference to sdpa is within 2x the
eager-vs-sdpa noise floor; in fp32 its logits also agree with the reference within ``FP32_LOGIT_TOL``.
Rank 0 writes ``DIR/tp_check.csv`` (one row per implementation and batch; ``tp_check_ARCH.csv`` for the other
``--arch`` choices, granite_swa and gpt_oss: models with attention sinks, whose reference is eager as they have
no sdpa). ``--extra-paths`` adds plugin's other decoding routes on the first batch size (static cache,
:class:`hf_attn_plugin.PagedCache`, :func:`hf_attn_plugin.generate_batch`), compared with the same reference
tokens; a route that raises is reported (CSV ``error`` column, exit status 1) and the others still run.

``--device cpu`` needs a machine without an accelerator: transformers picks the mesh's device type itself
(from ``torch._C._get_accelerator()``); on a GPU host run it with ``CUDA_VISIBLE_DEVICES=""``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from common import run_meta, write_rows

import hf_attn_plugin  # noqa: F401  (registers "plugin")
from hf_attn_plugin.integration import attention as plugin_attention_module


FP32_LOGIT_TOL = 1e-4  # fp32: plugin vs the reference differ by rounding only (measured ~2e-7 on the tiny model)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for tp_check.csv (and the model, by default)")
    p.add_argument("--model-dir", default=None,
                   help="where rank 0 saves / reuses the model (default OUT/model-ARCH[-tiny])")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model with 4/2 heads (CPU smoke test)")
    p.add_argument("--arch", choices=("llama", "granite_swa", "gpt_oss"), default="llama",
                   help="granite_swa: per-head attention sinks sharded with the heads (its plan: sinks colwise + "
                        "self_attn local_params) and sliding windows; gpt_oss: sinks, sliding windows, MoE (its "
                        "plan leaves attention unsharded). Neither has sdpa: eager is their reference")
    p.add_argument("--impls", default=None, help="default plugin,sdpa,eager (granite_swa: plugin,eager)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16; tiny: 2)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; tiny: 12)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 128; tiny: 6)")
    p.add_argument("--extra-paths", action="store_true",
                   help="also run plugin's static cache, PagedCache and generate_batch routes (first batch size)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default bf16 on cuda, fp32 on cpu")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in (a.batches or ("2" if a.tiny else "1,16")).split(",")]
    a.prompt = a.prompt or (12 if a.tiny else 512)
    a.new = a.new or (6 if a.tiny else 128)
    a.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    a.ref = "sdpa" if a.arch == "llama" else "eager"
    a.impls = (a.impls or ("plugin,sdpa,eager" if a.arch == "llama" else "plugin,eager")).split(",")
    if a.ref not in a.impls:
        raise SystemExit(f"--impls must include {a.ref}: every implementation is compared with it")
    return a


def make_config(tiny: bool, arch: str = "llama") -> transformers.PreTrainedConfig:
    """A Llama-style GQA config (~1B: hidden 2048, 16 layers, 32 query / 8 KV heads), or a tiny one."""
    size = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2) if tiny else dict(
                vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8)
    common = dict(sliding_window=8 if tiny else 128, max_position_embeddings=4096, pad_token_id=0,
                  bos_token_id=None, eos_token_id=None, **size)
    if arch == "granite_swa":
        return transformers.AutoConfig.for_model("granite_swa", **common)
    if arch == "gpt_oss":
        return transformers.AutoConfig.for_model("gpt_oss", head_dim=64 if not tiny else 16, num_local_experts=4,
                                                 num_experts_per_tok=2, **common)
    if tiny:
        return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        if torch._C._get_accelerator().type != "cpu":
            raise SystemExit("--device cpu: transformers builds its TP mesh on the machine's accelerator "
                             f"({torch._C._get_accelerator().type}); run with CUDA_VISIBLE_DEVICES=\"\"")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * world)))
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world, dev


def ensure_model(a, model_dir: Path, rank: int, dev: torch.device) -> None:
    """Rank 0 builds and saves the model once; the other ranks wait for it."""
    if rank == 0 and not (model_dir / "config.json").exists():
        config = make_config(a.tiny, a.arch)
        if not config.base_model_tp_plan and a.arch != "gpt_oss":  # gpt_oss: 5.17 has no plan, 5.24 embeddings only
            raise SystemExit(f"{type(config).__name__} has no base_model_tp_plan in transformers "
                             f"{transformers.__version__}: tp_plan='auto' would not shard it")
        transformers.set_seed(0)
        with dev:  # random init of ~1B parameters is slow on one CPU thread (torchrun sets OMP_NUM_THREADS=1)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=a.dtype)
        with torch.no_grad():  # sinks start at zero: make them distinct per head, so a misaligned shard shows
            for name, p in model.named_parameters():
                if name.endswith("sinks"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 2)
        model.generation_config.eos_token_id = None  # random weights: never stop early, all ranks run every step
        model.generation_config.pad_token_id = 0
        model.save_pretrained(model_dir)
        del model
    dist.barrier()


def load(model_dir: Path, impl: str, dtype: torch.dtype):
    """``from_pretrained(..., tp_plan="auto")``: through ``DistributedConfig`` where it takes a plan (newer
    releases deprecate the bare keyword), else the keyword itself (5.17)."""
    kwargs = {"attn_implementation": impl, "dtype": dtype}
    config_cls = getattr(transformers, "DistributedConfig", None)
    if config_cls is not None and "tp_plan" in {f.name for f in dataclasses.fields(config_cls)}:
        kwargs["distributed_config"] = config_cls(tp_plan="auto")
    else:
        kwargs["tp_plan"] = "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.eval()


class Probe:
    """Records what "plugin" is handed per call: tensor types and head counts (wraps ``describe_call``)."""

    def __init__(self):
        self.calls = []
        self._orig = plugin_attention_module.describe_call

    def __enter__(self):
        def probe(module, query, key, attention_mask, **kw):
            sinks = kw.get("s_aux")
            self.calls.append({"query_type": type(query).__name__, "key_type": type(key).__name__,
                               "q_heads": query.shape[1], "kv_heads": key.shape[1],
                               "sinks": None if sinks is None else (type(sinks).__name__, tuple(sinks.shape))})
            return self._orig(module, query, key, attention_mask, **kw)
        plugin_attention_module.describe_call = probe
        return self

    def __exit__(self, *exc):
        plugin_attention_module.describe_call = self._orig


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dist.barrier()


def timed(dev, fn):
    sync(dev)
    t0 = time.perf_counter()
    result = fn()
    sync(dev)
    return result, time.perf_counter() - t0


def generate_fn(model, ids, new, **extra):
    mask = torch.ones_like(ids)
    return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, **extra)[:, ids.shape[1]:]


def extra_path_fns(model, ids, new):
    """Other decoding routes of "plugin", on one batch: name -> a function returning the new tokens."""
    batch, prompt = ids.shape

    def paged():
        cache = hf_attn_plugin.PagedCache(model, max_batch_size=batch, page_size=16,
                                          num_pages=batch * (-(-(prompt + new) // 16) + 1))
        return generate_fn(model, ids, new, past_key_values=cache)()

    def continuous():
        config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
        outs = hf_attn_plugin.generate_batch(model, ids.tolist(), config)
        return torch.tensor([list(outs[k].generated_tokens) for k in sorted(outs, key=lambda r: int(r.split("_")[-1]))])

    return {"plugin+static_cache": generate_fn(model, ids, new, cache_implementation="static"),
            "plugin+PagedCache": paged, "plugin+generate_batch": continuous}


def attempt(dev, fn) -> dict:
    """Time ``fn()``; an exception becomes the run's ``error`` (reported in the CSV and the exit status)."""
    try:
        tokens, seconds = timed(dev, fn)
        return {"tokens": tokens.cpu(), "seconds": seconds, "error": None}
    except Exception as e:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return {"tokens": None, "seconds": float("nan"), "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:300]}


def run_impl(a, model_dir, impl, dev, prompts):
    """Logits of one forward over the prompt, then greedy generate per batch size (warm-up + timed)."""
    model = load(model_dir, impl, a.dtype)
    shards = {name: type(p).__name__ for name, p in model.named_parameters() if "layers.0.self_attn.q_proj" in name}
    out = {"shards": shards, "runs": {}, "logits": None}
    with torch.no_grad():
        with Probe() as probe:  # the contiguous-cache route only (a paged call describes itself differently)
            first = attempt(dev, lambda: model(input_ids=prompts[max(a.batches)][:1]).logits[:, -1].float())
            out["logits"] = first["tokens"]
            for batch in a.batches:
                ids = prompts[batch]
                warm = attempt(dev, generate_fn(model, ids[:, : min(32, a.prompt)], 4))  # compile / tune here
                out["runs"][(impl, batch)] = attempt(dev, generate_fn(model, ids, a.new)) if warm["error"] is None \
                    else warm
        if impl == "plugin" and a.extra_paths:
            batch = a.batches[0]
            for name, fn in extra_path_fns(model, prompts[batch], a.new).items():
                warm = attempt(dev, fn)  # the static cache compiles on its first call
                out["runs"][(name, batch)] = attempt(dev, fn) if warm["error"] is None else warm
    out["probe"] = probe.calls[:1] + [c for c in probe.calls[1:] if c != probe.calls[0]][:3]
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values / tp_plan renames across releases
    rank, world, dev = init_distributed(a.device)
    out_dir = Path(a.out)
    model_dir = Path(a.model_dir) if a.model_dir else out_dir / f"model-{a.arch}{'-tiny' if a.tiny else ''}"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    ensure_model(a, model_dir, rank, dev)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(1)  # identical prompts on every rank
    prompts = {b: torch.randint(1, config.vocab_size, (b, a.prompt), generator=gen).to(dev) for b in a.batches}

    results = {impl: run_impl(a, model_dir, impl, dev, prompts) for impl in a.impls}
    failures = []
    ref = results[a.ref]
    def logit_diff(res):
        if res["logits"] is None or ref["logits"] is None:
            return float("nan")
        return (res["logits"] - ref["logits"]).abs().max().item()

    floor = logit_diff(results["eager"]) if {"eager", "sdpa"} <= set(results) else None
    plan = config.base_model_tp_plan or {}
    heads_split = world if any(k.endswith("self_attn.k_proj") and v == "colwise" for k, v in plan.items()) else 1
    want_q, want_kv = config.num_attention_heads // heads_split, config.num_key_value_heads // heads_split
    for call in results.get("plugin", {}).get("probe", []):
        if call["query_type"] != "Tensor" or call["key_type"] != "Tensor":
            failures.append(f"plugin was handed {call['query_type']}/{call['key_type']}, not plain tensors")
        if (call["q_heads"], call["kv_heads"]) != (want_q, want_kv):
            failures.append(f"plugin saw {call['q_heads']}/{call['kv_heads']} heads, expected "
                            f"{want_q}/{want_kv} of {config.num_attention_heads}/{config.num_key_value_heads} "
                            f"(the plan splits the heads over {heads_split} ranks)")
        if call["sinks"] is not None and (call["sinks"][0] == "DTensor" or call["sinks"][1] != (want_q,)):
            failures.append(f"plugin was handed sinks {call['sinks']}, expected this rank's {want_q} as a plain tensor")
    rows = []
    for impl, res in results.items():
        diff = logit_diff(res)
        if impl == "plugin" and a.dtype == torch.float32 and not diff <= FP32_LOGIT_TOL:
            failures.append(f"plugin: fp32 last-position logits differ from {a.ref}'s by {diff:.3g} "
                            f"(> {FP32_LOGIT_TOL}), even if the few greedy tokens agree")
        for (route, batch), r in res["runs"].items():
            want = ref["runs"][(a.ref, batch)]["tokens"]
            equal, first_diff = False, None
            if r["error"] is not None:
                failures.append(f"{route} B={batch}: {r['error']}")
            elif want is not None:
                equal = bool(torch.equal(r["tokens"], want))
                if not equal:
                    first_diff = int((~(r["tokens"] == want).all(0)).nonzero()[0, 0])
            if (r["error"] is None and route.startswith("plugin") and not equal
                    and not (floor is not None and diff <= 2 * floor + 1e-6)):
                failures.append(f"{route} B={batch}: tokens differ from {a.ref}'s from step {first_diff} and the "
                                f"logit difference {diff:.3g} exceeds 2x the eager-vs-sdpa floor {floor}")
            rows.append({
                **run_meta("gpu", "torch", "transformers", "date", date_format="%Y-%m-%d %H:%M", device=dev),
                "impl": route, "world_size": world, "batch": batch, "prompt": a.prompt, "new_tokens": a.new,
                "dtype": str(a.dtype).removeprefix("torch."), "tok_s": round(batch * a.new / r["seconds"], 1),
                "tokens_equal": equal, "first_differing_step": first_diff,
                "arch": a.arch, "reference": a.ref, "max_abs_logit_diff_vs_ref": f"{diff:.4g}",
                "eager_vs_sdpa_floor": "" if floor is None else f"{floor:.4g}",
                "attn_input": ";".join(f"{c['query_type']} q{c['q_heads']}/kv{c['kv_heads']}"
                                     + (f" sinks {c['sinks'][0]}{list(c['sinks'][1])}" if c["sinks"] else "")
                                     for c in res["probe"]),
                "q_proj_param": ";".join(sorted(set(res["shards"].values()))),
                "error": r["error"] or "",
            })
    if rank == 0:
        path = out_dir / ("tp_check.csv" if a.arch == "llama" else f"tp_check_{a.arch}.csv")
        write_rows(path, rows)
        for row in rows:
            print(f"{row['impl']:>21} B={row['batch']:<3} {row['tok_s']:>9} tok/s  tokens_equal={row['tokens_equal']}"
                  f"  logit diff vs {a.ref} {row['max_abs_logit_diff_vs_ref']}  attn input {row['attn_input']}"
                  + (f"  ERROR {row['error']}" if row["error"] else ""))
        print(f"wrote {path}")
        print("FAIL:\n  " + "\n  ".join(failures) if failures else f"OK: plugin matches {a.ref} under tp_plan='auto'")
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: gloo's shutdown once aborted a rank after a passing run (SIGABRT)
