"""Generate the README's performance tables from benchmarks/results/*.csv (never type a number by hand).

    python benchmarks/report.py            # rewrites the block between the bench markers in README.md
    python benchmarks/report.py --print    # prints it instead
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def read(name: str) -> list[dict]:
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flash_section(name: str, title: str) -> str:
    rows = read(name)
    if not rows:
        return ""
    by_shape = defaultdict(dict)
    for r in rows:
        heads = f"{r['Hq']}/{r['Hkv']}"
        by_shape[(heads, int(r["S"]), int(r["B"]))][r["impl"]] = float(r["tflops"])
    body = []
    for (heads, seqlen, batch), impls in sorted(by_shape.items(), key=lambda kv: (kv[0][0] != "32/8", kv[0][1])):
        ours = impls.get("ours")
        if ours is None:
            continue

        def ratio(anchor):
            return f"{ours / impls[anchor]:.2f}x" if impls.get(anchor) else "-"

        body.append([heads, seqlen, batch, ours, impls.get("sdpa_cudnn", "-"), impls.get("sdpa_flash", "-"),
                     impls.get("flex", "-"), ratio("sdpa_cudnn"), ratio("flex")])
    meta = rows[0]
    header = ["Hq/Hkv", "S", "B", "ours", "SDPA cuDNN", "SDPA flash", "Flex", "ours/cuDNN", "ours/Flex"]
    return (f"**{title}** (TFLOP/s, bf16, D={meta['D']}, causal; {meta['gpu']}, torch {meta['torch']}, "
            f"triton {meta['triton']}, {meta['date']})\n\n" + table(header, body))


def models_section() -> str:
    """flash_models.csv (bench_flash.py --models): the shapes real models have, ours beside SDPA and Flex."""
    rows = read("flash_models.csv")
    if not rows:
        return ""
    by = defaultdict(dict)
    order = []
    latest = rows[0].get("run", "")
    older = {}  # key -> the earlier run its rows come from (a merged table: a run cut short keeps the older rows)
    for r in rows:
        key = (r["shape"], int(r["B"]), int(r["S"]), r["mode"])
        if key not in by:
            order.append(key)
        by[key][r["impl"].replace("+repeat", "")] = float(r["tflops"])
        if r.get("run", "") != latest:
            older[key] = r["run"]
    body = []
    for key in order:
        impls = by[key]
        ours = impls.get("ours")
        if ours is None:
            continue
        rivals = {k: v for k, v in impls.items() if k != "ours"}
        best = max(rivals, key=rivals.get) if rivals else None

        def cell(name):
            return impls.get(name, "-")

        body.append([key[0] + (" †" if key in older else ""), key[1], key[2], key[3], ours, cell("sdpa_cudnn"),
                     cell("sdpa_flash"), cell("flex"), cell("sdpa_mask"),
                     f"{ours / rivals[best]:.2f}x {best}" if best else "-"])
    meta = rows[0]
    note = (f"; † rows: {', '.join(sorted(set(older.values())))}'s measurement, not re-measured in {latest}'s run "
            "(time limit)" if older else "")
    header = ["shape", "B", "S", "mode", "ours", "SDPA cuDNN", "SDPA flash", "Flex", "SDPA + 4-D mask",
              "ours / fastest other"]
    return (f"**Shapes real models have** (TFLOP/s, bf16; `benchmarks/bench_flash.py --models`; {meta['gpu']}, torch "
            f"{meta['torch']}, triton {meta['triton']}, {meta['date']}; SDPA runs GQA natively where its backend takes "
            f"it{note})\n\n" + table(header, body))


def decode_section() -> str:
    """decode_kernels.csv (bench_decode.py): one decode step's attention over a contiguous cache. Device time from a
    CUDA-graph replay (``graph_us``) where the run has it, else from eager calls (``device_us``, which counts the host
    gaps between a call's launches)."""
    rows = [r for r in read("decode_kernels.csv") if not r.get("error")]
    if not rows:
        return ""
    graphs = all(r.get("graph_us") for r in rows)
    by = defaultdict(dict)
    for r in rows:
        us = float(r["graph_us"] if graphs else r["device_us"])  # gbps: K/V bytes over that same time
        by[(int(r["batch"]), int(r["ctx"]))][r["impl"]] = (us, float(r["gbps"]) / 1000, r.get("splits") or "")
    names = [n for n in ("plugin", "plugin_old_grid", "plugin_flash", "sdpa_cudnn", "sdpa_flash")
             if any(n in impls for impls in by.values())]
    body = []
    for (batch, ctx), impls in sorted(by.items()):
        def cell(name):
            if name not in impls:
                return "-"
            us, tbs, splits = impls[name]
            return f"{us:.1f} us, {tbs:.2f} TB/s" + (f" ({splits} splits)" if splits else "")
        ratio = (f"{impls['sdpa_cudnn'][0] / impls['plugin'][0]:.2f}x" if "plugin" in impls and "sdpa_cudnn" in impls
                 else "-")
        body.append([batch, ctx, *map(cell, names), ratio])
    meta = rows[0]
    labels = dict(plugin="plugin (decode route)", plugin_old_grid="plugin, previous split rule",
                  plugin_flash="plugin (flash path)", sdpa_cudnn="SDPA cuDNN", sdpa_flash="SDPA flash")
    header = ["B", "context", *(labels[n] for n in names), "plugin speed vs cuDNN"]
    timing = "CUDA-graph replay" if graphs else "eager calls"
    return (f"**Decode step, contiguous cache** (device time from {timing}, bytes of K/V read per second; Hq/Hkv "
            f"{meta['heads_q']}/{meta['heads_kv']}, D={meta['head_dim']}, {meta['dtype']}; {meta['device']}, "
            f"{meta['stamp']})\n\n" + table(header, body))


def generate_section() -> str:
    """generate_single_stream.csv: plain generate() at B=1 and the compiled static-cache route."""
    rows = read("generate_single_stream.csv")
    if not rows:
        return ""
    body = [[r["code"], r["route"], r["batch"], f"{r['prompt']} + {r['new']}", r["impl"], r["tok_s"],
             r["first_call_s"] or "-", r["compile_s"] or "-"] for r in rows]
    meta = rows[0]
    header = ["code", "route", "B", "tokens", "impl", "new tok/s", "first call (s)", "compile (s)"]
    return (f"**Single-stream generate()** (~1B Llama-style, 32/8 heads, D=64, 16 layers, bf16, random weights; "
            f"{meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']})\n\n"
            + table(header, body))


def window_section() -> str:
    rows = read("flash_window.csv")
    if not rows:
        return ""
    by_case = defaultdict(dict)
    for r in rows:
        by_case[(r["mode"], int(r["S"]))][r["impl"]] = float(r["tflops"])
    body = []
    for (mode, seqlen), impls in sorted(by_case.items()):
        ours = impls.get("ours")
        flex = impls.get("flex")
        mask = impls.get("sdpa_mask")
        body.append([mode, seqlen, ours, flex or "-", mask or "-",
                     f"{ours / flex:.2f}x" if ours and flex else "-", f"{ours / mask:.2f}x" if ours and mask else "-"])
    header = ["mode", "S", "ours", "Flex", "SDPA + 4D mask", "ours/Flex", "ours/SDPA-mask"]
    return "**Sliding window W=4096** (useful TFLOP/s, bf16, 32/8 heads, D=128)\n\n" + table(header, body)


def paged_section() -> str:
    rows = read("paged_decode.csv")
    if not rows:
        return ""
    decode = [r for r in rows if r["case"] != "copy" and "sweep" not in r["impl"] and r["impl"] != "split_study"
              and float(r["tbps"] or 0) > 0]
    body = [[r["case"], r["impl"], r.get("config", ""), r["batch"], r["tokens"], f"{float(r['tbps']):.2f}",
             f"{float(r['frac_copy']):.2f}"] for r in decode]
    copy = [r for r in rows if r["case"] == "copy"]
    note = f" Device copy (read + write): {float(copy[0]['tbps']):.2f} TB/s." if copy else ""
    header = ["case", "impl", "config", "batch", "cached tokens", "TB/s", "fraction of copy"]
    return f"**Paged decode** (bf16, 32/8 heads, D=128, page 16).{note}\n\n" + table(header, body)


def training_section() -> str:
    """Model-level training steps; each CSV is one process, so ratios are taken within a file only."""
    body = []
    for name in ("model_training.csv",):
        rows = read(name)
        for layout in dict.fromkeys(r["layout"] for r in rows):
            here = {r["impl"]: r for r in rows if r["layout"] == layout}
            ours = here.get("plugin")
            for impl, r in here.items():
                ratio = f"{float(ours['tokens_per_s']) / float(r['tokens_per_s']):.2f}x" if ours and impl != "plugin" else ""
                body.append([layout, impl, r["ms"], r["tokens_per_s"], ratio, name])
    if not body:
        return ""
    header = ["layout", "impl", "ms/step", "tokens/s", "plugin / impl", "run (CSV)"]
    return ("**Training step, ~1B Llama GQA** (hidden 2048, 16 layers, 32/8 heads, bf16, forward + backward, "
            "16k tokens as one sequence or 16 packed documents)\n\n" + table(header, body))


def generate_batch_section() -> str:
    parts = []
    rows = read("generate_batch.csv")
    if rows:
        engine = any(r["impl"] == "engine" for r in rows)
        parts.append(simple_section(
            "generate_batch.csv", "generate_batch, ~1B Llama GQA, 128 requests, 128 new tokens (two samples each, one "
            "process; plugin: engine=\"transformers\" with transformers' defaults, cache sized by transformers"
            + ("; engine: ours, its default EngineConfig, decode steps in CUDA graphs; GPU busy = graph time / wall "
               "time of the decode steps" if engine else "") + ")",
            ["impl", "transformers", "generated", "seconds", "new_tokens_per_s"]
            + (["decode_ms_per_step", "decode_gpu_busy", "identical_vs_plugin"] if engine else [])))
    if read("generate_batch_configs.csv"):
        parts.append(simple_section(
            "generate_batch_configs.csv", "generate_batch under ContinuousBatchingConfig options (one process, cache of "
            "1024 pages of 256; +blocktable: decode steps read the block table, +decodegraphs: those steps in CUDA "
            "graphs, +graphs: every step, +async: async batching; identical = greedy tokens equal to plain plugin)",
            ["impl", "seconds", "new_tokens_per_s", "identical_vs_plugin"]))
    host = read("host_overhead_generate_batch.csv")
    if host:
        cols = ["impl", "wall_ms_per_step", "prepare_ms", "compute_fwd_ms", "ours_ms", "glue_ms", "compute_wait_ms",
                "update_ms", "other_ms"]
        parts.append("**Host time per step** (ms; `prepare`: transformers' scheduler and index lists, `compute_fwd`: "
                     "the model forward on the host, of which `ours`: our attention path, `glue`: ours minus kernel "
                     "launches; benchmarks/host_overhead_generate_batch.py)\n\n"
                     + table(cols, [[r.get(c, "") for c in cols] for r in host]))
    prof = [r for r in read("generate_batch_profile.csv") if r["part"] in ("total", "kernels")]
    if prof:
        parts.append("**Where a `generate_batch` step goes** (plugin, under torch.profiler)\n\n" + table(
            ["what", "GPU kernels", "seconds", "share of wall"],
            [[r["category"], r["kernels"], r["seconds"], r["share_of_wall"]] for r in prof]))
    waste = read("kv_waste.csv")
    if waste:
        parts.append("**KV-cache waste** (allocated but unused slots)\n\n" + table(
            ["cache", "page size", "when", "waste"], [[r["cache"], r["page_size"], r["when"], r["waste"]] for r in waste]))
    logits = read("generate_batch_logits.csv")
    if logits:
        cols = ["check", "a", "b", "positions", "max_abs_diff", "top1_agreement", "identical_requests"]
        parts.append("**Logit-level agreement, bf16** (32 requests; eager vs sdpa is the noise floor)\n\n" + table(
            cols, [[r.get(c, "") for c in cols] for r in logits]))
    return "\n\n".join(parts)


def multi_gpu_section() -> str:
    rows = read("multi_gpu.csv")
    if not rows:
        return ""
    cols = ["label", "world_size", "fsdp", "per_device_batch", "global_batch", "step_ms", "tokens_per_s", "speedup_vs_1gpu_warm",
            "last_loss", "max_rel_loss_diff_vs_1gpu", "matches_1gpu"]
    # Labels carry the run's notes in brackets (see docs/uptraining.md); the table shows the run's name only.
    body = [[r["label"].split(" (")[0]] + [r.get(c, "") for c in cols[1:]] for r in rows]
    return ("**Trainer on 2 GPUs** (`benchmarks/multi_gpu_check.py`: same weights, same global batches; 32M GQA "
            "Llama, 60 steps; 1gpu_warm is the 1-GPU baseline, measured on a warm machine)\n\n" + table(cols, body))


def gqa_table(path: str) -> str:
    """The uptraining experiment's tables (benchmarks/gqa_experiment.py's gqa_results.csv at ``path``), as in
    docs/uptraining.md: perplexity, % vs MHA in brackets."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    mha = [r for r in rows if r["stage"] == "pretrained"]
    if not mha:
        return "(no pretrained row in the CSV)"
    mha_ppl = float(mha[-1]["val_ppl"])
    res = [r for r in rows if r["stage"] in ("converted", "uptrained", "mha_control") and r["val_ppl"]]
    alphas = sorted({float(r["alpha"]) for r in res})
    keys = []
    for r in res:
        k = (int(r["num_kv_heads"]), r["method"], r["grouping"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: -k[0])
    head = ["KV heads", "init", "KV bytes/token"] + [
        "after conversion" if al == 0 else f"alpha {100 * al:g}%" for al in alphas]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| {mha[-1]['num_kv_heads']} (MHA) | pretrained, {mha[-1]['steps']} steps | "
                 f"{mha[-1]['kv_bytes_per_token']} | {mha_ppl:.2f} |" + " |" * (len(alphas) - 1))
    for g, meth, grp in keys:
        cells = []
        for al in alphas:
            hit = [r for r in res if (int(r["num_kv_heads"]), r["method"], r["grouping"]) == (g, meth, grp)
                   and float(r["alpha"]) == al]
            if hit:
                ppl = float(hit[-1]["val_ppl"])
                cells.append(f"{ppl:.2f} ({100 * (ppl / mha_ppl - 1):+.1f}%)")
            else:
                cells.append("")
        name = ("MHA + same extra steps" if meth == "mha"
                else meth if grp == "adjacent" else f"{meth} + {grp} grouping")
        kvb = next(r["kv_bytes_per_token"] for r in res if int(r["num_kv_heads"]) == g)
        label = "1 (MQA)" if g == 1 else (f"{g} (MHA)" if meth == "mha" else str(g))
        lines.append(f"| {label} | {name} | {kvb} | " + " | ".join(cells) + " |")
    curve = [r for r in rows if r["stage"] == "pretrain_curve"]
    if curve:
        lines.append("")
        lines.append("MHA validation perplexity during pretraining (step: ppl): " + ", ".join(
            f"{r['steps']}: {float(r['val_ppl']):.2f}" for r in curve) + f"; final {mha_ppl:.2f}.")
    sweep = [r for r in rows if r["stage"] == "lr_sweep"]
    if sweep:
        lines.append("")
        lines.append(f"Uptraining peak LR chosen on G={sweep[0]['num_kv_heads']} {sweep[0]['method']} alpha "
                     f"{100 * float(sweep[0]['alpha']):g}% (validation ppl): " + ", ".join(
                         f"{float(r['uptrain_lr']):g}: {float(r['val_ppl']):.2f}" for r in sweep) + ".")
    speed = [r for r in rows if r["stage"] == "decode_speed"]
    if speed:
        ref = float(speed[0]["decode_attn_us"])
        lines += ["", "Decode attention per step, all layers, paged kernels (" + speed[0]["note"] + "):", "",
                  "| KV heads | KV cache (GB) | attention per step (us) | vs MHA | TB/s |", "|---|---|---|---|---|"]
        for r in speed:
            lines.append(f"| {r['num_kv_heads']} | {float(r['decode_kv_gb']):.2f} | {float(r['decode_attn_us']):.1f} "
                         f"| {ref / float(r['decode_attn_us']):.2f}x faster | {float(r['decode_tb_s']):.2f} |")
    skipped = [r for r in rows if r["stage"] == "skipped"]
    if skipped:
        lines.append("")
        lines.append("Skipped for time: " + ", ".join(
            f"G={r['num_kv_heads']} {r['method']}/{r['grouping']} alpha {100 * float(r['alpha']):g}%" for r in skipped))
    return "\n".join(lines)


def gqa_section() -> str:
    """The uptraining experiment's tables (gqa_experiment.py --table prints the same)."""
    path = os.path.join(RESULTS, "gqa_results.csv")
    if not os.path.exists(path):
        return ""
    return ("**GQA uptraining experiment** (62.9M MHA Llama, 12 heads, validation perplexity; "
            "[docs/uptraining.md](docs/uptraining.md))\n\n" + gqa_table(path))


def simple_section(name: str, title: str, columns: list[str]) -> str:
    rows = read(name)
    if not rows:
        return ""
    return f"**{title}**\n\n" + table(columns, [[r.get(c, "") for c in columns] for r in rows])


def head_dims_section() -> str:
    """head_dims.csv (bench_head_dims.py): every head dim at one shape, ours beside SDPA and Flex."""
    rows = read("head_dims.csv")
    if not rows:
        return ""
    by = defaultdict(dict)
    for r in rows:
        by[(int(r["D"]), r["mode"])][r["impl"]] = float(r["tflops"])
    body = []
    for (d, mode), impls in sorted(by.items(), key=lambda kv: (kv[0][1] != "fwd", kv[0][0])):
        ours = impls.get("ours")

        def ratio(anchor):
            return f"{ours / impls[anchor]:.2f}x" if ours and impls.get(anchor) else "-"

        body.append([mode, d, ours or "-", impls.get("sdpa_cudnn", "-"), impls.get("sdpa_flash", "-"),
                     impls.get("flex", "-"), ratio("sdpa_cudnn"), ratio("sdpa_flash"), ratio("flex")])
    meta = rows[0]
    header = ["mode", "D", "ours", "SDPA cuDNN", "SDPA flash", "Flex", "ours/cuDNN", "ours/flash", "ours/Flex"]
    return (f"**Every head dim** (TFLOP/s, bf16, causal, B={meta['B']} S={meta['S']} {meta['Hq']}/{meta['Hkv']} heads; "
            f"`benchmarks/bench_head_dims.py`; {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"{meta['date']}; '-': no kernel for that head dim)\n\n" + table(header, body))


def cold_start_section() -> str:
    """cold_start.csv (bench_cold_start.py): the first generate() of a fresh process, and the worst decode step."""
    rows = read("cold_start.csv")
    if not rows:
        return ""
    body = [[r["impl"], r["triton_cache"], r["first_call_s"], f"{r['new']}", r["median_step_ms"], r["worst_step_ms"],
             f"{r['worst_over_median']}x (step {r['worst_step']})"] for r in rows]
    meta = rows[0]
    header = ["impl", "Triton cache", "first generate() (s)", "then new tokens", "median step (ms)",
              "worst step (ms)", "worst / median"]
    return (f"**Cold start** (a fresh process per row; first call: {meta['prompt']}-token prompt + "
            f"{meta['first_call_new']} new; then one long generation timed per step; ~1B Llama-style, bf16; "
            f"`benchmarks/bench_cold_start.py`; {meta['gpu']}, torch {meta['torch']}, transformers "
            f"{meta['transformers']}, {meta['date']})\n\n" + table(header, body))


def render() -> str:
    parts = [
        flash_section("flash_fwd.csv", "Forward"),
        flash_section("flash_fwdbwd.csv", "Forward + backward"),
        models_section(),
        head_dims_section(),
        window_section(),
        paged_section(),
        decode_section(),
        generate_section(),
        cold_start_section(),
        training_section(),
        generate_batch_section(),
        multi_gpu_section(),
        gqa_section(),
    ]
    return "\n\n".join(p for p in parts if p) or "(no GPU results yet)"

GUIDE_START, GUIDE_END = "<!-- guide:start -->", "<!-- guide:end -->"
IMPL_NAMES = {"sdpa_cudnn": "SDPA (cuDNN)", "sdpa_flash": "SDPA (flash)", "flex": "Flex", "sdpa": "sdpa",
              "flex_attention": "flex_attention", "sdpa_mask": "SDPA + 4-D mask"}


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _span(ratios: list[float]) -> str:
    lo, hi = min(ratios), max(ratios)
    return _x(lo) if f"{lo:.2f}" == f"{hi:.2f}" else f"{_x(lo)}–{_x(hi)}"


def _verdict(points: list[tuple[int, float]], rival: str, unit: str = "S") -> str:
    """``points`` = (size, ours / rival); who wins where, from the numbers only."""
    wins = sorted(n for n, r in points if r >= 1.0)
    losses = sorted(n for n, r in points if r < 1.0)
    if not losses:
        return "**plugin**"
    if not wins:
        return f"**{rival}**"
    if max(wins) < min(losses):
        return f"**plugin** at {unit} ≤ {max(wins)}, **{rival}** at {unit} ≥ {min(losses)}"
    if max(losses) < min(wins):
        return f"**{rival}** at {unit} ≤ {max(losses)}, **plugin** at {unit} ≥ {min(wins)}"
    return f"mixed: plugin at {unit} = {', '.join(map(str, wins))}; {rival} at {unit} = {', '.join(map(str, losses))}"


def _flash_guide(name: str, what: str) -> list[list[str]]:
    """One row per (D, GQA or MHA): ours against the fastest other implementation of each shape."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in read(name):
        kind = "GQA" if r["Hq"] != r["Hkv"] else "MHA"
        groups[(int(r["D"]), kind, f"{r['Hq']}/{r['Hkv']}")][int(r["S"])][r["impl"]] = float(r["tflops"])
    rows = []
    for (dim, kind, heads), by_s in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "GQA")):
        points, rivals = [], {}
        for seqlen, impls in sorted(by_s.items()):
            others = {k: v for k, v in impls.items() if k != "ours"}
            if "ours" not in impls or not others:
                continue
            best = max(others, key=others.get)
            rivals[seqlen] = IMPL_NAMES.get(best, best)
            points.append((seqlen, impls["ours"] / others[best]))
        if not points:
            continue
        losing = sorted({rivals[n] for n, r in points if r < 1.0}) or sorted(set(rivals.values()))
        rows.append([f"{what}, {kind} {heads}, D={dim}, S {points[0][0]}–{points[-1][0]}",
                     f"{_span([r for _, r in points])} vs the fastest of {', '.join(sorted(set(rivals.values())))}",
                     _verdict(points, " / ".join(losing)), name])
    return rows


def guide_section() -> str:
    """The README's "Which attention implementation should I use?" table, from benchmarks/results only."""
    rows = _flash_guide("flash_fwd.csv", "Forward (prefill, scoring)")
    rows += _flash_guide("flash_fwdbwd.csv", "Forward + backward (training)")
    window = defaultdict(dict)
    for r in read("flash_window.csv"):
        window[r["mode"]][int(r["S"])] = {**window[r["mode"]].get(int(r["S"]), {}), r["impl"]: float(r["tflops"])}
    for mode, by_s in sorted(window.items()):
        for rival in ("flex", "sdpa_mask"):
            points = [(n, i["ours"] / i[rival]) for n, i in sorted(by_s.items()) if "ours" in i and rival in i]
            if points:
                label = "forward + backward" if "fwdbwd" in mode else "forward"
                rows.append([f"Sliding window {mode.split('_')[0].replace('window', 'W=')}, {label}",
                             f"{_span([r for _, r in points])} vs {IMPL_NAMES[rival]}",
                             _verdict(points, IMPL_NAMES[rival]), "flash_window.csv"])
    training = read("model_training.csv")
    for layout in dict.fromkeys(r["layout"] for r in training):
        here = {r["impl"]: float(r["tokens_per_s"]) for r in training if r["layout"] == layout}
        if "plugin" not in here:
            continue
        for impl, tps in here.items():
            if impl != "plugin":
                ratio = here["plugin"] / tps
                what = "16 packed documents" if layout == "packed" else "one 16k sequence"
                rows.append([f"Training step, ~1B Llama, {what}", f"{_x(ratio)} vs {impl}",
                             "**plugin**" if ratio >= 1 else f"**{impl}**", "model_training.csv"])
    paged = defaultdict(dict)
    for r in read("paged_decode.csv"):
        if r["case"] != "copy" and float(r["tbps"] or 0) > 0:
            paged[r["case"]].setdefault(r["impl"], float(r["tbps"]))
    for case, impls in paged.items():
        others = {k: v for k, v in impls.items() if k != "ours" and k.startswith("sdpa")}
        if "ours" in impls and others:
            best = max(others, key=others.get)
            ratio = impls["ours"] / others[best]
            cache = "padded contiguous cache" if best.endswith("_padded") else "contiguous cache"
            base = best.removesuffix("_padded")
            rival = f"{IMPL_NAMES.get(base, base)} on a {cache}"
            rows.append([f"Decode, paged KV cache, {case}", f"{_x(ratio)} vs {rival}",
                         "**plugin**" if ratio >= 1 else f"**{rival}**", "paged_decode.csv"])
    rows += _generate_guide()
    gen = read("generate_batch.csv")
    sdpa = [float(r["new_tokens_per_s"]) for r in gen if r["impl"] == "sdpa"]
    for impl, what in (("engine", "our engine (the default)"), ("plugin", "engine=\"transformers\"")):
        ours = [float(r["new_tokens_per_s"]) for r in gen if r["impl"] == impl]
        if ours and sdpa and len(ours) == len(sdpa):
            ratios = [a / b for a, b in zip(ours, sdpa)]
            rows.append([f"Continuous batching (`generate_batch`, {what}), ~1B Llama, 128 requests",
                         f"{_span(ratios)} vs sdpa", "**plugin**" if min(ratios) >= 1 else "mixed", "generate_batch.csv"])
    if not rows:
        return "(no GPU results yet)"
    meta = next((r for n in ("flash_fwd.csv", "model_training.csv") for r in read(n)), {})
    where = f"{meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, bf16" if meta else "GPU results"
    return (f"Speed of `\"plugin\"` relative to the fastest other implementation measured on each shape ({where}; "
            "above 1.00x the plugin is faster). Features decide first: `output_attentions=True` or custom 4-D "
            "masks need `eager`/`sdpa`; on CPU the plugin runs a pure-PyTorch reference meant "
            "for testing, not for speed: use `sdpa` there.\n\n"
            + table(["workload", "plugin speed", "faster here", "CSV"], rows) + _dims_note())


def _generate_guide() -> list:
    """Single-stream generate() (per route, batch and prompt: its latest run in generate_single_stream.csv) and the
    decode step (decode_kernels.csv, per batch): plugin against the fastest other implementation."""
    rows = []
    single = read("generate_single_stream.csv")
    latest = {}  # (route, batch, prompt) -> the code label of its last rows
    for r in single:
        latest[r["route"], r["batch"], r["prompt"]] = r["code"]
    for (route, batch, prompt), code in sorted(latest.items(), key=lambda kv: (int(kv[0][1]), kv[0][0])):
        here = {r["impl"]: float(r["tok_s"]) for r in single
                if r["code"] == code and (r["route"], r["batch"], r["prompt"]) == (route, batch, prompt)}
        ours = max((k for k in here if k.startswith("plugin")), key=here.get, default=None)
        others = {k: v for k, v in here.items() if not k.startswith("plugin")}
        if ours and others:
            best = max(others, key=others.get)
            ratio = here[ours] / others[best]
            rows.append([f"generate(), B={batch}, {prompt}-token prompt, ~1B Llama: {route}"
                         + (f" ({ours})" if ours != "plugin" else ""), f"{_x(ratio)} vs {best}",
                         f"**{ours}**" if ratio >= 1 else f"**{best}**", "generate_single_stream.csv"])
    decode = defaultdict(dict)
    for r in read("decode_kernels.csv"):
        if not r.get("error"):
            decode[int(r["batch"])][(int(r["ctx"]), r["impl"])] = float(r.get("graph_us") or r["device_us"])
    for batch, times in sorted(decode.items()):
        ratios, contexts = [], sorted({c for c, _ in times})  # per context: the fastest SDPA backend's time over ours
        for ctx in contexts:
            sdpa = [us for (c, impl), us in times.items() if c == ctx and impl.startswith("sdpa")]
            if (ctx, "plugin") in times and sdpa:
                ratios.append(min(sdpa) / times[(ctx, "plugin")])
        if ratios:
            rows.append([f"Decode step, contiguous cache, B={batch}, context {contexts[0]}–{contexts[-1]}",
                         f"{_span(ratios)} vs SDPA",
                         "**plugin**" if min(ratios) >= 1 else "**SDPA**" if max(ratios) < 1 else "mixed",
                         "decode_kernels.csv"])
    return rows


def _dims_note() -> str:
    dims = sorted({int(r["D"]) for n in ("flash_fwd.csv", "flash_fwdbwd.csv", "flash_models.csv") for r in read(n)})
    missing = [d for d in (64, 128, 256) if d not in dims]
    if not dims or not missing:
        return ""
    return (f"\n\nHead dims measured: {', '.join(map(str, dims))}. Not measured here: "
            f"{', '.join(map(str, missing))} (64 is SmolLM2's and many small models'): this table says nothing "
            "about them.")


def replace_block(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block: add the two markers where the table goes")
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{block}\n{end}", text, flags=re.S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the tables instead of rewriting README.md")
    args = parser.parse_args()
    block = render()
    guide = guide_section()
    if args.print:
        print(guide + "\n\n" + block)
        return
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    new = replace_block(replace_block(text, GUIDE_START, GUIDE_END, guide), START, END, block)
    with open(readme, "w") as f:
        f.write(new)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
