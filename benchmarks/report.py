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
    decode = [r for r in rows if r["case"] != "copy" and "sweep" not in r["impl"] and float(r["tbps"] or 0) > 0]
    body = [[r["case"], r["impl"], r.get("config", ""), r["batch"], r["tokens"], f"{float(r['tbps']):.2f}",
             f"{float(r['frac_copy']):.2f}"] for r in decode]
    copy = [r for r in rows if r["case"] == "copy"]
    note = f" Device copy (read + write): {float(copy[0]['tbps']):.2f} TB/s." if copy else ""
    header = ["case", "impl", "config", "batch", "cached tokens", "TB/s", "fraction of copy"]
    return f"**Paged decode** (bf16, 32/8 heads, D=128, page 16).{note}\n\n" + table(header, body)


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
        simple_section("model_training.csv", "Training step, ~1B Llama GQA, 16k tokens",
                       ["layout", "impl", "ms", "tokens_per_s"]),
        simple_section("generate_batch.csv", "generate_batch, ~1B Llama GQA", ["impl", "generated", "seconds", "new_tokens_per_s"]),
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
