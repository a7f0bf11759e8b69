"""Walkthrough: MHA checkpoint -> GQA with convert-to-gqa, and what the grouping choice costs.

Without downloads: trains a small byte-level Llama (MHA) on Python standard-library sources for a few minutes
on CPU, saves it, converts it to G KV heads with adjacent and with similarity grouping (weights only and with
calibration text), and compares held-out perplexity before uptraining. The recipe for a real model is the
same two lines:

    convert-to-gqa ./my-mha-model ./my-gqa-model --num-kv-heads 8 --grouping similarity --verify
    # then uptrain ./my-gqa-model with Trainer (about 5% of the pretraining steps in the GQA paper)

    python examples/convert_walkthrough.py --steps 300 --kv-heads 1 2 4
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_attn_plugin.conversion import convert_to_gqa


def stdlib_bytes(names: list[str]) -> torch.Tensor:
    lib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((lib / name).read_bytes() for name in names)
    return torch.tensor(list(data), dtype=torch.long)


TRAIN_FILES = ["argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "subprocess.py"]
HELD_OUT_FILES = ["functools.py", "shutil.py"]


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, seq: int, batch: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        starts = torch.randint(len(data) - seq, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)


@torch.no_grad()
def perplexity(path: Path, data: torch.Tensor, seq: int = 256) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = data[: len(data) // seq * seq].view(-1, seq)[:64]
    losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    return math.exp(torch.stack(losses).mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    work = Path(tempfile.mkdtemp(prefix="gqa-walkthrough-", dir=args.workdir))
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    train_data, held_out = stdlib_bytes(TRAIN_FILES), stdlib_bytes(HELD_OUT_FILES)
    start = time.perf_counter()
    train(model, train_data, args.steps, seq=256, batch=args.batch)
    print(f"trained in {time.perf_counter() - start:.0f}s")
    model.save_pretrained(work / "mha")
    calibration = bytes(train_data[:4096].tolist()).decode("utf-8", errors="replace")

    base = perplexity(work / "mha", held_out)
    print(f"\nheld-out perplexity (bytes), MHA 8 KV heads: {base:.4f}")
    print(f"{'G':>3} {'grouping':<24} {'perplexity':>10} {'delta':>9}")
    for g in args.kv_heads:
        for label, kwargs in [
            ("adjacent", {}),
            ("similarity (weights)", {"grouping": "similarity"}),
            ("similarity (calibration)", {"grouping": "similarity", "calibration_text": calibration}),
        ]:
            dst = work / f"gqa{g}-{label.split()[0]}-{len(kwargs)}"
            convert_to_gqa(work / "mha", dst, num_kv_heads=g, progress=False, **kwargs)
            ppl = perplexity(dst, held_out)
            print(f"{g:>3} {label:<24} {ppl:>10.4f} {ppl - base:>+9.4f}")


if __name__ == "__main__":
    main()
