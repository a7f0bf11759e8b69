#!/usr/bin/env python
"""Uptraining on several GPUs with ``Trainer`` + ``"plugin"``: does DDP / FSDP match one GPU, and how does it scale?

Three steps, each a separate command (the recipe's functions from ``examples/uptrain_gqa.py``; no ``datasets``
needed, so it runs on a bare GPU image)::

    python benchmarks/multi_gpu_check.py prepare --work /tmp/mg              # tokenizer, chunks, a GQA model
    torchrun --nproc_per_node 1 benchmarks/multi_gpu_check.py run --work /tmp/mg --label 1gpu
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_check.py run --work /tmp/mg --label ddp2
    torchrun --nproc_per_node 2 benchmarks/multi_gpu_check.py run --work /tmp/mg --label fsdp2 --fsdp
    python benchmarks/multi_gpu_check.py report --work /tmp/mg --out DIR      # CSV + verdict

Every run trains the same initial weights on the same global batches: chunks are taken in order
(``train_sampling_strategy="sequential"``) and the per-device batch is ``--global-batch / world size``, so rank r of
W sees the r-th slice of exactly the batch one GPU sees; ``average_tokens_across_devices`` (Trainer's default)
normalises the loss by the global token count. The per-step training losses must then agree within bf16 noise.
``--weak`` runs keep the per-device batch of the 1-GPU run instead (throughput scaling; different batches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch
import transformers
from common import device_name, load_example, write_rows
from gqa_experiment import StepTimer

ug = load_example("uptrain_gqa")


def prepare(a) -> None:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    files = ug.stdlib_files(a.max_files)
    train_files, _ = ug.split_files(files, 5.0)
    docs = ug.read_documents(train_files)
    tok = ug.train_tokenizer(docs, vocab_size=8192, max_chars=3_000_000)
    chunks = ug.tokenize_documents(tok, docs, a.seq_len)
    random.Random(0).shuffle(chunks)
    model = ug.build_llama(len(tok), hidden=768, layers=4, heads=12, kv_heads=3, seed=0)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    torch.save(chunks, work / "chunks.pt")
    print(f"prepared {len(chunks)} chunks ({sum(len(c['input_ids']) for c in chunks) / 1e6:.2f}M tokens), "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params (12 query / 3 KV heads)")


def run(a) -> None:
    work = Path(a.work)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()  # CPU (gloo, reference attention) only to check the script itself
    if cuda:
        torch.cuda.set_device(local)
    per_device = a.global_batch if a.weak else a.global_batch // world
    if not a.weak and a.global_batch % world:
        raise SystemExit(f"--global-batch {a.global_batch} does not divide over {world} processes")
    chunks = torch.load(work / "chunks.pt")
    model = ug.load_model(work / "model")
    extra = {"train_sampling_strategy": "sequential"}
    if a.fsdp:
        extra.update(fsdp="full_shard auto_wrap",
                     fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = ug.make_training_args(str(work / f"out_{a.label}"), a.steps, lr=1e-3, batch_size=per_device,
                                 logging_steps=1, seed=0, **extra)
    if cuda and not a.fsdp:
        model.cuda(local)
    timer = StepTimer()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=chunks,
                                   data_collator=transformers.DataCollatorWithFlattening(), callbacks=[timer])
    model.config.use_cache = False
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steady = timer.times[min(5, len(timer.times) // 3):]  # skip compilation/tuning of the first steps
    step_s = (steady[-1] - steady[0]) / max(1, len(steady) - 1)
    tokens_per_step = sum(len(c["input_ids"]) for c in chunks[:a.global_batch * a.steps]) / a.steps
    if a.weak:
        tokens_per_step *= world
    if rank == 0:
        res = dict(label=a.label, world_size=world, fsdp=a.fsdp, weak=a.weak, per_device_batch=per_device,
                   global_batch=per_device * world, steps=a.steps, step_ms=1e3 * step_s,
                   tokens_per_s=tokens_per_step / step_s, losses=losses,
                   gpu=device_name(), torch=torch.__version__, transformers=transformers.__version__)
        (work / f"result_{a.label}.json").write_text(json.dumps(res))
        print(f"{a.label}: {world} GPU(s), per-device batch {per_device}, {1e3 * step_s:.1f} ms/step, "
              f"{res['tokens_per_s']:.0f} tokens/s, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)


def report(a) -> int:
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {p.stem[len("result_"):]: json.loads(p.read_text()) for p in sorted(work.glob("result_*.json"))}
    base = results.get("1gpu")
    if base is None:
        print("no 1gpu result")
        return 1
    rows, ok = [], True
    for label, r in results.items():
        row = {k: r[k] for k in ("label", "world_size", "fsdp", "weak", "per_device_batch", "global_batch", "steps",
                                 "gpu", "torch", "transformers")}
        row.update(step_ms=round(r["step_ms"], 2), tokens_per_s=round(r["tokens_per_s"]),
                   speedup_vs_1gpu=round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                   first_loss=round(r["losses"][0], 4), last_loss=round(r["losses"][-1], 4))
        if not r["weak"] and label != "1gpu":
            diffs = [abs(x - y) / max(abs(y), 1e-6) for x, y in zip(r["losses"], base["losses"])]
            row["max_rel_loss_diff_vs_1gpu"] = round(max(diffs), 5)
            row["mean_rel_loss_diff_vs_1gpu"] = round(sum(diffs) / len(diffs), 5)
            # bf16 autocast with a different reduction order: a few 1e-3 relative; 2% would be a real mismatch.
            row["matches_1gpu"] = max(diffs) < 0.02
            ok &= row["matches_1gpu"]
        rows.append(row)
    write_rows(out / "multi_gpu.csv", rows)
    for r in rows:
        print(r)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="tokenizer, chunks and the initial GQA model under --work")
    pp.add_argument("--work", required=True)
    pp.add_argument("--seq-len", type=int, default=512)
    pp.add_argument("--max-files", type=int, default=None)
    pr = sub.add_parser("run", help="one Trainer run (start it with torchrun / accelerate launch)")
    pr.add_argument("--work", required=True)
    pr.add_argument("--label", required=True)
    pr.add_argument("--steps", type=int, default=60)
    pr.add_argument("--global-batch", type=int, default=64, help="chunks per optimizer step over all GPUs")
    pr.add_argument("--fsdp", action="store_true", help="FSDP full_shard of the decoder layers instead of DDP")
    pr.add_argument("--weak", action="store_true", help="per-device batch = --global-batch (throughput scaling)")
    pq = sub.add_parser("report", help="compare the runs under --work, write multi_gpu.csv")
    pq.add_argument("--work", required=True)
    pq.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a)
    elif a.cmd == "run":
        run(a)
    else:
        return report(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
