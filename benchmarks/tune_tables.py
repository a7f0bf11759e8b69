#!/usr/bin/env python
"""Tune the shipped launch-config table of this GPU's architecture (``hf_attn_plugin/kernels/tuned/<arch>.json``).

    python benchmarks/tune_tables.py --out DIR            # writes DIR/<arch>.json and DIR/tune_tables_log.txt

Runs the flash kernels through their real code path with tuning forced on for every key (the shipped table and the
user's persisted results ignored, nothing persisted) and records each key's winner. Key space (bf16; fp16 shares
the table): head dims 128, 64, 256 (in that order), causal on/off, GQA 32/8 (group bucket 4) and MHA 16/16
(group 1), sequence buckets 16k down to 128 at B*S = 16k tokens; forward (kind ``fwd``) and backward (``bwd_dkdv``,
``bwd_dq``). Window / softcap / segments / sinks map to the plain entries (the variant logs showed the same
winners or differences within noise: benchmarks/NOTES_flash.md v5). The paged kernels are not tuned here (decode
is bandwidth-bound; their defaults come from the sweeps in benchmarks/NOTES_paged.md).

The forward candidates include the Gluon Hopper forward's variants (``Config.gluon`` 0..3, D 64/128): the forward's
launch runs them through ``gluon_fwd`` and the tuner skips them where they cannot run (not sm_90, a Triton without
Gluon: ``configs.Unsupported``). Where a Gluon variant wins, the entry also records the fastest Triton candidate as
its ``fallback`` (what calls the Gluon kernel cannot run, e.g. with a window, use).

Time: every candidate is first compiled in parallel worker processes on tiny inputs of the same specialization
(they fill Triton's on-disk cache), then the main process times the candidates; cases start only while the wall
time is below ``--budget-s`` (default 210 s: the whole run fits in 4 minutes on the H200), and the table is
rewritten after every case, so a run cut short still leaves a valid (smaller) table. Lookups fall back to the
nearest bucket, so the most used cases come first.

Re-tuning part of the table (one head dim, one kernel): ``--kinds bwd_dkdv`` tunes only those kernels (the others
run their default config, untimed), ``--merge`` also writes ``DIR/<arch>.merged.json``: the shipped table with this
run's entries put in (same key: replaced; new key: added), every other entry and its evidence kept; copy it over
``hf_attn_plugin/kernels/tuned/<arch>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import multiprocessing
import os
import sys
import time

import torch
import triton

from hf_attn_plugin.kernels import configs, flash
from hf_attn_plugin.kernels.params import AttentionParams

TOKENS = 16384
SEQS = (16384, 8192, 4096, 2048, 1024, 512, 256, 128)
HEADS = {4: (32, 8), 1: (16, 16)}  # group bucket -> (Hq, Hkv): the shapes of benchmarks/bench_flash.py
KINDS = ("fwd", "bwd_dq", "bwd_dkdv")


def cases(dims, causals, groups, seqs):
    """(D, causal, group, S) in priority order: the most used head dim, causal, GQA first; long S first."""
    return [(d, c, g, s) for d in dims for c in causals for g in groups for s in seqs]


def inputs(d, group, s, tokens=TOKENS, seed=0):
    hq, hkv = HEADS[group]
    b = max(1, tokens // s)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
    return q, k, v


def run_once(q, k, v, causal, backward=True):
    params = AttentionParams.create(q.shape[-1], causal=causal)
    out, lse = flash.flash_attn_forward(q, k, v, params)
    if backward:
        flash.flash_attn_backward(torch.randn_like(out), q, k, v, out, lse, params)


# --------------------------------------------------------------------------------------------- parallel compiles
def _compile_job(job):
    """Worker: compile one candidate (``kind`` forced to ``cfg``, the others at their defaults) on tiny inputs."""
    d, causal, group, kind, cfg = job
    defaults = configs._GPU

    def forced(k, block_d):
        return (cfg,) if k == kind else defaults[(k, configs._dim_bucket(block_d))][:1]

    configs.candidates = forced
    t0 = time.time()
    try:
        run_once(*inputs(d, group, 256, tokens=512), causal, backward=kind != "fwd")
        torch.cuda.synchronize()
        return job, time.time() - t0, None
    except Exception as exc:  # reported; the timing phase skips what the compiler rejects
        return job, time.time() - t0, f"{type(exc).__name__}: {str(exc)[:200]}"


def warm_compiles(case_list, jobs, log, kinds=KINDS):
    todo = sorted({(d, c, g, kind, cfg) for d, c, g, _ in case_list for kind in kinds
                   for cfg in configs._GPU[(kind, configs._dim_bucket(d))]}, key=str)
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for job, seconds, err in pool.map(_compile_job, todo):
            if err:
                log(f"compile {job}: {err}")
    log(f"compiled {len(todo)} candidate kernels in {time.time() - t0:.1f} s with {jobs} processes")


# --------------------------------------------------------------------------------------------- timing
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for <arch>.json and tune_tables_log.txt")
    parser.add_argument("--budget-s", type=float, default=210.0, help="start no new case after this wall time")
    parser.add_argument("--dims", default="128,64,256")
    parser.add_argument("--seqs", default=",".join(map(str, SEQS)))
    parser.add_argument("--groups", default="4,1", help=f"group buckets among {sorted(HEADS)}")
    parser.add_argument("--causal", default="1,0")
    parser.add_argument("--jobs", type=int, default=min(14, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--no-warm", action="store_true", help="compile in the main process while timing")
    parser.add_argument("--kinds", default=",".join(KINDS), help="the kernels to tune (the others run their default)")
    parser.add_argument("--merge", action="store_true", help="also write <arch>.merged.json: the shipped table with "
                        "this run's entries put in")
    args = parser.parse_args()
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "tune_tables_log.txt"), "w")

    def log(msg):
        line = f"[{time.time() - start:6.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: a comma-separated list among {', '.join(KINDS)}, got {args.kinds!r}")
    case_list = cases(ints(args.dims), [bool(c) for c in ints(args.causal)], ints(args.groups), ints(args.seqs))
    arch, gpu = configs.gpu_arch(), torch.cuda.get_device_name()
    log(f"{gpu} ({arch}), torch {torch.__version__}, triton {triton.__version__}: {len(case_list)} cases")
    if not args.no_warm:
        try:
            warm_compiles(case_list, args.jobs, log, kinds)
        except Exception as exc:  # a worker died (e.g. out of memory): the timing phase compiles what is missing
            log(f"parallel compiles stopped: {type(exc).__name__}: {exc}")

    # Every key tuned: no shipped table, no persisted results, tuning on, nothing written to the user's cache.
    os.environ["HF_ATTN_PLUGIN_AUTOTUNE"] = "1"
    os.environ["HF_ATTN_PLUGIN_TUNE_CACHE"] = "0"
    configs.clear_cache()
    configs.shipped_table = lambda arch: configs.Table({})
    all_candidates = configs.candidates
    configs.candidates = lambda kind, block_d: (  # a list of one is used as it is, untimed
        all_candidates(kind, block_d) if kind in kinds else all_candidates(kind, block_d)[:1])
    results = {}  # Key -> (timings, case)
    real_tune = configs.tune

    def recording_tune(options, launch, key=""):
        timings = real_tune(options, launch, key)
        results[key] = (timings, current)
        return timings

    configs.tune = recording_tune
    path = os.path.join(args.out, f"{arch}.json")
    done = 0
    for current in case_list:
        if time.time() - start > args.budget_s:
            log(f"budget of {args.budget_s:.0f} s reached: {len(case_list) - done} cases left untuned")
            break
        d, causal, group, s = current
        t0 = time.time()
        q, k, v = inputs(d, group, s)
        run_once(q, k, v, causal)
        del q, k, v
        done += 1
        write_table(path, results, arch, gpu, args, done, len(case_list))
        summary = " ".join(f"{key.kind}={_short(t[0][0])}" for key, (t, c) in results.items() if c == current and t)
        log(f"D={d} causal={int(causal)} group={group} S={s}: {summary} ({time.time() - t0:.1f} s)")
    log(f"wrote {path}: {len(results)} entries from {done} cases")
    if args.merge:
        merged, n = merge_into_shipped(path, arch, kinds)
        log(f"wrote {merged}: the shipped table with {n} entries of {', '.join(kinds)} from this run")


def merge_into_shipped(path: str, arch: str, kinds) -> tuple:
    """``<path without .json>.merged.json``: the shipped table of ``arch`` with the entries of ``path`` whose kind is
    in ``kinds`` put in; returns (its path, the number of entries taken)."""
    shipped_path = configs._TABLE_DIR / f"{arch}.json"
    with open(shipped_path) as f:
        shipped = json.load(f)
    with open(path) as f:
        tuned = json.load(f)
    rows = {configs.Key.from_json(row["key"]): row for row in shipped.get("entries", ())}
    taken = [row for row in tuned["entries"] if row["key"]["kind"] in kinds]
    rows.update({configs.Key.from_json(row["key"]): row for row in taken})
    merged = dict(shipped, source=f"{shipped.get('source', '')}; {len(taken)} entries of {', '.join(kinds)} from "
                                  f"{tuned.get('source', path)} ({tuned.get('created', '')})",
                  entries=[row for key, row in sorted(rows.items(), key=lambda kv: configs._sort_key(kv[0]))])
    configs.Table.from_json(merged, "merged table")  # valid before it is written
    out = path[: -len(".json")] + ".merged.json"
    with open(out, "w") as f:
        f.write(configs.dumps_table(merged))
    return out, len(taken)


def _short(cfg: configs.Config) -> str:
    if cfg.gluon >= 0:
        return f"gluon_ws{cfg.gluon}"
    return f"{cfg.block_m}x{cfg.block_n},{cfg.num_warps}w,{cfg.num_stages}s" + (",ws" if cfg.warp_spec else "")


def write_table(path, results, arch, gpu, args, done, total):
    entries, evidence, fallbacks = {}, {}, {}
    for key, (timings, (d, causal, group, s)) in results.items():
        if not timings:
            continue
        best, best_ms = timings[0]
        default = configs._GPU[(key.kind, key.dim)][0]
        default_ms = dict(timings).get(default)
        hq, hkv = HEADS[group]
        entries[key] = best
        triton_best = next(((c, ms) for c, ms in timings if c.gluon < 0), None)
        if best.gluon >= 0 and triton_best is not None:
            fallbacks[key] = triton_best[0]
        evidence[key] = {"evidence": f"B{max(1, TOKENS // s)} S{s} {hq}/{hkv} D{d}: {best_ms:.4f} ms"
                                     + (f"; default {default_ms:.4f} ms" if default_ms else "; default unusable")
                                     + (f"; runner-up {_short(timings[1][0])} {timings[1][1]:.4f} ms"
                                        if len(timings) > 1 else "")
                                     + (f"; fallback (best Triton) {_short(triton_best[0])} {triton_best[1]:.4f} ms"
                                        if key in fallbacks else "")}
    meta = dict(arch=arch, gpu=gpu, triton=triton.__version__, torch=torch.__version__,
                dtype="bfloat16 (float16 shares the entries)",
                created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                source=f"benchmarks/tune_tables.py ({' '.join(sys.argv[1:])}): {done} of {total} cases, "
                       f"B*S={TOKENS} tokens, do_bench medians; window/softcap/segments/sinks use the plain entries")
    text = configs.dumps_table(configs.Table(entries, meta, fallbacks).to_json(evidence))
    json.loads(text)  # valid before it replaces the last one
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
