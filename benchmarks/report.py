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
    by_shape, runs = defaultdict(dict), {}
    for r in rows:
        heads = f"{r['Hq']}/{r['Hkv']}"
        by_shape[(heads, int(r["S"]), int(r["B"]))][r["impl"]] = float(r["tflops"])
        runs[(heads, int(r["S"]), int(r["B"]))] = r.get("run", "")
    body = []
    for (heads, seqlen, batch), impls in sorted(by_shape.items(), key=lambda kv: (kv[0][0] != "32/8", kv[0][1])):
        ours = impls.get("ours")
        if ours is None:
            continue

        def ratio(anchor):
            return f"{ours / impls[anchor]:.2f}x" if impls.get(anchor) else "-"

        body.append([heads, seqlen, batch, ours, impls.get("sdpa_cudnn", "-"), impls.get("sdpa_flash", "-"),
                     impls.get("flex", "-"), ratio("sdpa_cudnn"), ratio("flex"), runs[(heads, seqlen, batch)] or "-"])
    meta = rows[0]
    header = ["Hq/Hkv", "S", "B", "ours", "SDPA cuDNN", "SDPA flash", "Flex", "ours/cuDNN", "ours/Flex", "run"]
    return (f"**{title}** (TFLOP/s, bf16, D={meta['D']}, causal; {meta['gpu']}, torch {meta['torch']}, "
            f"triton {meta['triton']}, {meta['date']})\n\n" + table(header, body))


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
        parts.append(simple_section("generate_batch.csv", "generate_batch, ~1B Llama GQA, 128 requests, 128 new tokens "
                                    "(two samples each, one process, transformers' defaults, cache sized by transformers)",
                                    ["impl", "transformers", "generated", "seconds", "new_tokens_per_s"]))
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
    return ("**Trainer on 2 GPUs** (`benchmarks/multi_gpu_check.py`: same weights, same global batches; 32M GQA "
            "Llama, 60 steps)\n\n" + table(cols, [[r.get(c, "") for c in cols] for r in rows]))


def gqa_section() -> str:
    """The uptraining experiment's tables, from its own CSV formatter (benchmarks/gqa_experiment.py)."""
    path = os.path.join(RESULTS, "gqa_results.csv")
    if not os.path.exists(path):
        return ""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gqa_experiment import markdown_table

    return ("**GQA uptraining experiment** (62.9M MHA Llama, 12 heads, validation perplexity; "
            "[docs/uptraining.md](docs/uptraining.md))\n\n" + markdown_table(path))


def simple_section(name: str, title: str, columns: list[str]) -> str:
    rows = read(name)
    if not rows:
        return ""
    return f"**{title}**\n\n" + table(columns, [[r.get(c, "") for c in columns] for r in rows])


def render() -> str:
    parts = [
        flash_section("flash_fwd.csv", "Forward"),
        flash_section("flash_fwdbwd.csv", "Forward + backward"),
        window_section(),
        paged_section(),
        training_section(),
        generate_batch_section(),
        multi_gpu_section(),
        gqa_section(),
    ]
    return "\n\n".join(p for p in parts if p) or "(no GPU results yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the tables instead of rewriting README.md")
    args = parser.parse_args()
    block = render()
    if args.print:
        print(block)
        return
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{block}\n{END}", text, flags=re.S)
    with open(readme, "w") as f:
        f.write(new)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
