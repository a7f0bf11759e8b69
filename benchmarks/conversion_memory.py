"""Peak memory of convert-to-gqa on a multi-GB synthetic sharded checkpoint.

Writes a Llama-shaped bf16 MHA checkpoint directly with safetensors (no model object, so writing it needs
one shard of memory), converts it in a fresh subprocess while sampling that process's RSS, and appends one
row to benchmarks/results/conversion_memory.csv. The claim under test: peak RSS above the import baseline is
bounded by about the largest shard, not by the model size.

    python benchmarks/conversion_memory.py --layers 8 --shard-gb 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, append_rows, run_meta
from safetensors.torch import save_file

CSV = RESULTS / "conversion_memory.csv"


def llama_tensor_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def split_into_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int, itemsize: int) -> list[list[str]]:
    """Greedy in-order sharding, like save_pretrained's max_shard_size."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_checkpoint(root: Path, args: argparse.Namespace) -> None:
    dtype = torch.bfloat16
    shapes = llama_tensor_shapes(args.layers, args.hidden, args.intermediate, args.vocab)
    shards = split_into_shards(shapes, int(args.shard_gb * 2**30), dtype.itemsize)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.empty(shapes[n], dtype=dtype).normal_(0, 0.02) for n in names}, root / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(torch.Size(s).numel() * dtype.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    heads = args.hidden // 128
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": args.vocab, "dtype": "bfloat16", "tie_word_embeddings": False,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))


def measure_conversion(src: Path, dst: Path, num_kv_heads: int) -> dict[str, float]:
    """Run in the child: convert while a thread samples RSS; ru_maxrss confirms the sampled peak."""
    from hf_attn_plugin.conversion import convert_to_gqa

    def rss_kib() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
        return fields

    baseline = rss_kib()
    peak = dict(baseline)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for key, value in rss_kib().items():
                peak[key] = max(peak[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    convert_to_gqa(src, dst, num_kv_heads=num_kv_heads, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {
        "seconds": seconds,
        "baseline_rss_bytes": baseline["VmRSS"] * 1024,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_sampled_bytes": peak["VmRSS"] * 1024,
        "peak_rss_anon_bytes": peak["RssAnon"] * 1024,
        "peak_rss_file_bytes": peak["RssFile"] * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the checkpoint (deleted after)")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_conversion(Path(args.child[0]), Path(args.child[1]), args.num_kv_heads)))
        return

    work = Path(tempfile.mkdtemp(prefix="gqa-mem-", dir=args.workdir))
    try:
        src, dst = work / "src", work / "dst"
        src.mkdir()
        write_checkpoint(src, args)
        shard_sizes = [f.stat().st_size for f in src.glob("*.safetensors")]
        child = subprocess.run(
            [sys.executable, __file__, "--num-kv-heads", str(args.num_kv_heads), "--child", str(src), str(dst)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if child.returncode:
            sys.exit(f"conversion failed:\n{child.stderr}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        output_bytes = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    finally:
        shutil.rmtree(work)
    largest = max(shard_sizes)
    meta = run_meta("date", "torch", "safetensors")
    row = {
        "date": meta["date"],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": meta["torch"],
        "safetensors": meta["safetensors"],
        "layers": args.layers,
        "hidden": args.hidden,
        "dtype": "bfloat16",
        "num_shards": len(shard_sizes),
        "total_bytes": sum(shard_sizes),
        "largest_shard_bytes": largest,
        "output_bytes": output_bytes,
        "kv_heads": f"{args.hidden // 128}->{args.num_kv_heads}",
        **result,
        "peak_over_baseline_bytes": result["peak_rss_bytes"] - result["baseline_rss_bytes"],
        "peak_over_baseline_per_largest_shard": round(
            (result["peak_rss_bytes"] - result["baseline_rss_bytes"]) / largest, 3
        ),
    }
    CSV.parent.mkdir(parents=True, exist_ok=True)
    append_rows(CSV, [row])
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
