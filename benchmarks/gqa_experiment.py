#!/usr/bin/env python
"""The GQA paper's uptraining experiment, end to end, on the plugin's kernels (GPU; ``--smoke`` runs on CPU).

1. Pretrain a small MHA Llama decoder (12 heads, head_dim 64, seq 512) on Python sources nobody here wrote (the
   standard library, plus site-packages where the stdlib is trimmed), with held-out files for validation
   (validation perplexity logged along the way).
2. Convert it with ``convert_to_gqa`` to G KV heads (methods mean / first / random, and mean with similarity
   grouping).
3. Validation perplexity right after conversion (alpha = 0).
4. Uptrain each converted model with ``Trainer`` + ``"plugin"`` for alpha x the pretraining steps (same data, same
   schedule shape: warmup + cosine; peak LR from a small sweep on the first configuration) and measure validation
   perplexity again; the MHA model gets the same extra steps as a control.
5. Decode attention time and KV memory at the model's shapes on the paged kernels, per KV-head count (GPU).
6. Write ``gqa_results.csv`` (rows flushed as they complete, so a timeout still leaves data) and ``gqa_ppl.png``.
   Every row carries the KV-cache bytes per token of its model (bf16).

Everything runs inside one time budget (``--time-budget``): with ``--pretrain-steps auto`` the pretraining length
is chosen from a measured step time so that pretraining + the whole uptraining grid fit; runs that would not fit
anyway are recorded as ``skipped``. Uptraining runs go by priority: alpha 5% first, then the larger ones, then the
smaller ones.

Needs no ``datasets`` (plain-Python reading/tokenization from examples/uptrain_gqa.py), so it runs where only
torch/transformers/tokenizers are installed.

example:
    python benchmarks/gqa_experiment.py --out /tmp/gqa                       # GPU, ~9 min (one H200)
    python benchmarks/gqa_experiment.py --smoke --out /tmp/gqa-smoke         # CPU, whole pipeline, tiny
    python benchmarks/gqa_experiment.py --out /tmp/gqa --pretrain-steps 4000 --model-size medium \\
        --groups H/2,H/4,1 --methods mean,first,random,similarity --full-grid --alphas 0.01,0.025,0.05,0.1 \\
        --time-budget 0
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from common import append_rows, bench_ms, load_example, pyplot, run_meta
from report import gqa_table
from transformers import TrainerCallback

from hf_attn_plugin.conversion import convert_to_gqa

ug = load_example("uptrain_gqa")

SIZES = {  # name: (hidden, layers, heads, intermediate, vocab)
    "tiny": (96, 2, 12, 256, 512),       # smoke test only (head_dim 8)
    "small": (768, 4, 12, 2048, 8192),   # ~35M params, head_dim 64
    "medium": (768, 8, 12, 2048, 8192),  # ~63M params
    "base": (768, 12, 12, 2048, 16384),  # ~97M params
}
FIELDS = ["stage", "num_kv_heads", "method", "grouping", "alpha", "steps", "pretrain_steps", "val_loss", "val_ppl",
          "ppl_vs_mha_pct", "uptrain_lr", "kv_bytes_per_token", "params_m", "train_wall_s", "steps_per_s", "tokens_per_s",
          "elapsed_s", "decode_attn_us", "decode_kv_gb", "decode_tb_s", "model_size", "device", "torch", "transformers",
          "date", "note"]


class CsvLog:
    """gqa_results.csv, started afresh; every row appended as it completes (a timeout still leaves data)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        path.unlink(missing_ok=True)

    def row(self, **kw):
        r = {**self.meta, **kw}
        r = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
        append_rows(self.path, [{k: r.get(k, "") for k in FIELDS}], FIELDS)
        print("ROW", {k: r[k] for k in ("stage", "num_kv_heads", "method", "grouping", "alpha", "steps", "val_ppl")
                      if k in r}, flush=True)


def corpus_files(kind: str, max_chars: float) -> list[str]:
    """``stdlib``: the standard library's sources. ``python``: those plus every ``.py`` file of the installed
    site-packages (third-party code nobody here wrote), in a deterministic crc32 order, up to ``max_chars``.
    ``auto``: ``python`` where the standard library alone is small (some images ship a trimmed one).
    """
    files = ug.stdlib_files()
    size = sum(os.path.getsize(f) for f in files)
    if kind == "stdlib" or (kind == "auto" and size >= max_chars):
        return files
    import sysconfig
    import zlib
    seen, extra = set(files), []
    for key in ("purelib", "platlib"):
        root = sysconfig.get_paths()[key]
        for dirpath, _, names in os.walk(root):
            extra += [os.path.join(dirpath, n) for n in names if n.endswith(".py")]
    extra = sorted((f for f in set(extra) if f not in seen and os.path.isfile(f)), key=lambda f: zlib.crc32(f.encode()))
    out = list(files)
    for f in extra:
        if size >= max_chars:
            break
        out.append(f)
        size += os.path.getsize(f)
    return out


def parse_groups(spec: str, heads: int) -> list[int]:
    out = []
    for tok in spec.split(","):
        tok = tok.strip().upper()
        g = heads // int(tok[2:]) if tok.startswith("H/") else (1 if tok == "MQA" else int(tok))
        if g < 1 or heads % g:
            raise SystemExit(f"--groups: {tok} gives {g} KV heads, which does not divide {heads} heads")
        if g not in out:
            out.append(g)
    return out


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes


class StepTimer(TrainerCallback):
    """``times``: ``perf_counter()`` at the end of every optimizer step (after a device sync)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def measure_step_time(make_model, train, a) -> float:
    """A short throwaway Trainer run (also compiles/autotunes the kernels); median seconds per step."""
    model = make_model()
    timer = StepTimer()
    args = ug.make_training_args(tempfile.mkdtemp(), a.probe_steps, lr=a.lr, batch_size=a.batch_size,
                                 logging_steps=10**6, num_workers=a.workers)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   data_collator=transformers.DataCollatorWithFlattening(), callbacks=[timer])
    model.config.use_cache = False
    trainer.train()
    d = sorted(b - c for b, c in zip(timer.times[3:], timer.times[2:-1])) or [1.0]
    del trainer, model
    gc.collect()
    return d[len(d) // 2]


def decode_speed(layers: int, heads: int, head_dim: int, kv_heads: int, batch: int = 128, context: int = 2048,
                 page_size: int = 16) -> dict:
    """Paged decode attention for one step of this model (all layers): microseconds, KV bytes read, TB/s.

    Random bf16 pools with shuffled block tables (a real cache's pages are scattered), ``batch`` sequences of
    ``context`` cached tokens, timed with CUDA-graph replay. The reason to convert at all: decode attention reads
    the whole KV cache every step, so its time and memory scale with the number of KV heads.
    """
    from hf_attn_plugin.paged_ops import paged_attention

    pages_per_seq = context // page_size
    pages = batch * pages_per_seq
    g = torch.Generator(device="cuda").manual_seed(0)
    k_pool = torch.randn(pages, page_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v_pool = torch.randn_like(k_pool)
    tables = torch.randperm(pages, device="cuda", generator=g).view(batch, pages_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = lambda: paged_attention(q, k_pool, v_pool, tables, seq_lens)  # noqa: E731
    fn()
    ms = bench_ms(fn, rep=50, cuda_graph=True, statistic="mean")
    kv_bytes = 2 * k_pool.numel() * k_pool.element_size()
    return {"decode_attn_us": 1e3 * ms * layers, "decode_kv_gb": kv_bytes * layers / 1e9,
            "decode_tb_s": kv_bytes / (ms * 1e-3) / 1e12}


def plot(csv_path: Path, png_path: Path, heads: int):
    plt = pyplot()
    if plt is None:
        return
    import matplotlib.ticker
    rows = list(csv.DictReader(open(csv_path)))
    mha = [r for r in rows if r["stage"] == "pretrained"]
    conv = [r for r in rows if r["stage"] in ("converted", "uptrained") and r["val_ppl"]]
    gs = sorted({int(r["num_kv_heads"]) for r in conv}, reverse=True)
    if not gs:
        return
    fig, axes = plt.subplots(1, len(gs), figsize=(5.5 * len(gs), 4.2), squeeze=False)
    for ax, g in zip(axes[0], gs):
        for key in sorted({(r["method"], r["grouping"]) for r in conv if int(r["num_kv_heads"]) == g}):
            pts = sorted((float(r["alpha"]), float(r["val_ppl"])) for r in conv
                         if int(r["num_kv_heads"]) == g and (r["method"], r["grouping"]) == key)
            label = key[0] if key[1] == "adjacent" else f"{key[0]}+{key[1]}"
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        if mha:
            ax.axhline(float(mha[-1]["val_ppl"]), color="k", ls="--", lw=1, label="MHA (pretrained)")
        ctl = sorted((float(r["alpha"]), float(r["val_ppl"])) for r in rows if r["stage"] == "mha_control")
        if ctl:
            ax.plot([100 * x for x, _ in ctl], [y for _, y in ctl], "k^", label="MHA + same extra steps")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("uptraining steps, % of pretraining (alpha)")
        ax.set_ylabel("validation perplexity")
        ax.set_title("MQA (1 KV head)" if g == 1 else f"GQA-{g} ({heads} query heads)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("example:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for gqa_results.csv, gqa_ppl.png")
    p.add_argument("--table", metavar="CSV", help="only print the markdown results table of a results CSV")
    p.add_argument("--replot", metavar="CSV", help="only redraw gqa_ppl.png beside a results CSV")
    p.add_argument("--smoke", action="store_true", help="tiny everything, CPU, ~1-2 min: checks the pipeline")
    p.add_argument("--model-size", choices=sorted(SIZES), default=None, help="default medium (smoke: tiny)")
    p.add_argument("--pretrain-steps", default="auto", help="int, or auto: fit the time budget (default)")
    p.add_argument("--max-pretrain-steps", type=int, default=3000, help="cap for auto")
    p.add_argument("--time-budget", type=float, default=550.0, help="seconds for the whole script (0: no limit)")
    p.add_argument("--alphas", default="0.05,0.1,0.025", help="uptraining fractions, in priority order")
    p.add_argument("--groups", default="H/4,H/2,1", help="KV head counts: ints, H/k or MQA (default H/4,H/2,1)")
    p.add_argument("--methods", default="mean,first,random,similarity",
                   help="mean, first, random, similarity (= mean with similarity grouping)")
    p.add_argument("--full-grid", action="store_true", help="every method for every G (default: all methods for "
                   "the first G only, mean for the others)")
    p.add_argument("--mha-control", action="store_true", default=True,
                   help="also continue training the MHA model for the first alpha (default on)")
    p.add_argument("--no-mha-control", dest="mha_control", action="store_false")
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (smoke 64)")
    p.add_argument("--batch-size", type=int, default=None, help="chunks per step (default 64: ~32k tokens)")
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak LR of pretraining")
    p.add_argument("--uptrain-lrs", default="1.5e-3,4.5e-4,1.5e-4",
                   help="candidate peak LRs of uptraining, tried on the first configuration at the first alpha; the "
                   "one with the lowest validation perplexity is used for every uptraining run and the MHA control "
                   "(one value: no sweep)")
    p.add_argument("--val-chunks", type=int, default=None, help="validation chunks (default 384, smoke 24)")
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--corpus", choices=["auto", "stdlib", "python"], default="auto",
                   help="stdlib sources; python = stdlib + site-packages .py files; auto (default): python when the "
                   "stdlib is smaller than --max-chars")
    p.add_argument("--max-chars", type=float, default=250e6, help="corpus size cap in bytes (default 250e6)")
    p.add_argument("--max-epochs", type=float, default=1.5,
                   help="auto pretraining length never exceeds this many passes over the training tokens")
    p.add_argument("--probe-steps", type=int, default=12)
    p.add_argument("--workers", type=int, default=None, help="dataloader workers (default 2 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.table:
        print(gqa_table(a.table))
        return 0
    if a.replot:
        plot(Path(a.replot), Path(a.replot).with_name("gqa_ppl.png"), 12)
        return 0
    if not a.out:
        p.error("--out is required")
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    transformers.utils.logging.disable_progress_bar()
    if a.smoke:
        a.model_size = a.model_size or "tiny"
        a.seq_len = a.seq_len or 64
        a.batch_size = a.batch_size or 8
        a.val_chunks = a.val_chunks or 24
        a.max_files = a.max_files or 60
        if a.pretrain_steps == "auto":
            a.pretrain_steps = "30"
        a.alphas = "0.1,0.2" if a.alphas == p.get_default("alphas") else a.alphas
        a.time_budget = 0 if a.time_budget == p.get_default("time_budget") else a.time_budget
        a.probe_steps = 5
    a.model_size = a.model_size or "medium"
    a.seq_len = a.seq_len or 512
    a.batch_size = a.batch_size or 64
    a.val_chunks = a.val_chunks or 384
    a.workers = a.workers if a.workers is not None else (2 if cuda else 0)
    budget = a.time_budget or float("inf")
    elapsed = lambda: time.perf_counter() - t0  # noqa: E731
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gqa_exp_"))
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    hidden, layers, heads, inter, vocab = SIZES[a.model_size]
    head_dim = hidden // heads
    meta = {"model_size": a.model_size,
            **run_meta("device", "torch", "transformers", "date", date_format="%Y-%m-%d %H:%M")}
    log = CsvLog(out / "gqa_results.csv", meta)
    print(f"device {meta['device']}; torch {torch.__version__}; transformers {transformers.__version__}", flush=True)

    # ---- data: stdlib sources, held-out files, BPE tokenizer trained on the training files only
    files = ug.stdlib_files() if a.smoke else corpus_files(a.corpus, a.max_chars)[:a.max_files]
    if a.smoke:
        files = files[::max(1, len(files) // a.max_files)][:a.max_files]
    train_files, val_files = ug.split_files(files, 5.0)
    train_docs, val_docs = ug.read_documents(train_files), ug.read_documents(val_files)
    rng = random.Random(a.seed)
    sample = train_docs[:]
    rng.shuffle(sample)
    tok = ug.train_tokenizer(sample, vocab_size=vocab, max_chars=400_000 if a.smoke else 6_000_000)
    train = ug.tokenize_documents(tok, train_docs, a.seq_len)
    val = ug.tokenize_documents(tok, val_docs, a.seq_len)
    rng.shuffle(val)
    val = val[:a.val_chunks]
    train_tokens = sum(len(x["input_ids"]) for x in train)
    avg_len = train_tokens / len(train)
    tokens_per_step = a.batch_size * avg_len
    print(f"[{elapsed():.0f}s] {len(train_files)} train / {len(val_files)} val files; {len(train)} train chunks "
          f"({train_tokens / 1e6:.2f}M tokens), {len(val)} val chunks; vocab {len(tok)}; "
          f"~{tokens_per_step:.0f} tokens/step", flush=True)

    def make_model():
        m = ug.build_llama(len(tok), hidden=hidden, layers=layers, heads=heads, intermediate=inter,
                           max_positions=max(2048, a.seq_len), seed=a.seed)
        return m.cuda() if cuda else m

    kw = dict(lr=a.lr, batch_size=a.batch_size, num_workers=a.workers, seed=a.seed)
    eval_bs = a.batch_size
    alphas = [float(x) for x in a.alphas.split(",")]
    uptrain_lrs = [float(x) for x in a.uptrain_lrs.split(",")]
    groups = parse_groups(a.groups, heads)
    methods = [m.strip() for m in a.methods.split(",")]
    configs = []  # (G, method, grouping)
    for i, g in enumerate(groups):
        for m in (methods if (i == 0 or a.full_grid) else ["mean"]):
            cfg = (g, "mean", "similarity") if m == "similarity" else (g, m, "adjacent")
            if cfg[2] == "similarity" and g == 1:
                continue  # one group: every grouping is the same
            configs.append(cfg)

    # ---- pretraining length
    if a.pretrain_steps == "auto":
        step_t = measure_step_time(make_model, train, a)
        t_eval = time.perf_counter()
        m = make_model()
        ug.evaluate_perplexity(m, val, batch_size=eval_bs)
        if cuda:
            torch.cuda.synchronize()
        t_eval = time.perf_counter() - t_eval
        del m
        n_sweep = len(uptrain_lrs) - 1 if len(uptrain_lrs) > 1 else 0
        n_runs = len(configs) * len(alphas) + (1 if a.mha_control else 0) + n_sweep
        fixed = elapsed() + 40 + len(configs) * (3 + t_eval) + n_runs * (2.5 + t_eval) + 9 * t_eval
        per_p = step_t * (1 + sum(alphas) * len(configs) + alphas[0] * ((1 if a.mha_control else 0) + n_sweep)) * 1.08
        P = int((budget - fixed) / per_p) if math.isfinite(budget) else a.max_pretrain_steps
        P_epochs = int(a.max_epochs * train_tokens / tokens_per_step)
        if P_epochs < P:
            print(f"epoch cap: {P} steps would be {P * tokens_per_step / train_tokens:.1f} passes over the data; "
                  f"pretraining {P_epochs} steps ({a.max_epochs} passes) instead", flush=True)
            P = P_epochs
        P = max(50, min(a.max_pretrain_steps, P))
        print(f"[{elapsed():.0f}s] probe: {step_t * 1e3:.1f} ms/step, eval {t_eval:.1f}s -> pretrain {P} steps "
              f"({n_runs} uptraining runs)", flush=True)
    else:
        P = int(a.pretrain_steps)

    # ---- 1. pretrain MHA
    mha = make_model()
    n_params = sum(x.numel() for x in mha.parameters()) / 1e6
    kvb = lambda g: kv_bytes_per_token(layers, g, head_dim)  # noqa: E731
    base = dict(pretrain_steps=P, params_m=n_params)
    print(f"[{elapsed():.0f}s] MHA Llama {n_params:.1f}M params: hidden {hidden}, {layers} layers, {heads} heads x "
          f"{head_dim}; pretraining {P} steps", flush=True)

    def hook(step, model):
        r = ug.evaluate_perplexity(model, val, batch_size=eval_bs)
        log.row(stage="pretrain_curve", num_kv_heads=heads, method="mha", grouping="", alpha="", steps=step,
                val_loss=r["loss"], val_ppl=r["ppl"], kv_bytes_per_token=kvb(heads), elapsed_s=elapsed(), **base)

    res = ug.train(mha, train, ug.make_training_args(str(work / "pre"), P, logging_steps=max(1, P // 20), **kw),
                   hook_every=max(1, P // 8), hook=hook)
    r = ug.evaluate_perplexity(mha, val, batch_size=eval_bs)
    mha_ppl = r["ppl"]
    log.row(stage="pretrained", num_kv_heads=heads, method="mha", grouping="", alpha=0.0, steps=P, val_loss=r["loss"],
            val_ppl=r["ppl"], ppl_vs_mha_pct=0.0, kv_bytes_per_token=kvb(heads), train_wall_s=res["wall_s"],
            steps_per_s=res["steps_per_s"], tokens_per_s=tokens_per_step * res["steps_per_s"], elapsed_s=elapsed(),
            **base)
    src = work / "mha"
    mha.save_pretrained(src)
    tok.save_pretrained(src)
    mha_state = {k: v.detach().cpu().clone() for k, v in mha.state_dict().items()}
    del mha, res
    gc.collect()

    # ---- 2./3. convert every config, perplexity right after conversion
    converted = {}
    for g, meth, grp in configs:
        dst = work / f"g{g}_{meth}_{grp}"
        convert_to_gqa(src, dst, num_kv_heads=g, method=meth, grouping=grp, seed=a.seed, progress=False)
        m = ug.load_model(dst)
        m = m.cuda() if cuda else m
        r = ug.evaluate_perplexity(m, val, batch_size=eval_bs)
        log.row(stage="converted", num_kv_heads=g, method=meth, grouping=grp, alpha=0.0, steps=0, val_loss=r["loss"],
                val_ppl=r["ppl"], ppl_vs_mha_pct=100 * (r["ppl"] / mha_ppl - 1), kv_bytes_per_token=kvb(g),
                elapsed_s=elapsed(), **base)
        converted[(g, meth, grp)] = dst
        del m

    # ---- 4. uptraining: LR sweep on the first job, then the grid by priority; skip what cannot fit the budget
    step_est = None

    def uptrain_job(al, g, meth, grp, lr):
        nonlocal step_est
        steps = max(1, round(al * P))
        row = dict(num_kv_heads=g, method=meth, grouping=grp, alpha=al, steps=steps, kv_bytes_per_token=kvb(g),
                   uptrain_lr=lr, **base)
        est = (step_est or 0) * steps + 5
        if step_est is not None and elapsed() + est > budget:
            return row, None, f"needs ~{est:.0f}s, budget left {budget - elapsed():.0f}s"
        if meth == "mha":
            m = make_model()
            m.load_state_dict(mha_state)
        else:
            m = ug.load_model(converted[(g, meth, grp)])
            m = m.cuda() if cuda else m
        res = ug.uptrain(m, train, val, str(work / "up"), steps, save=False, eval_batch_size=eval_bs,
                         eval_before=False, logging_steps=max(1, steps // 5), **dict(kw, lr=lr))
        step_est = max(step_est or 0, res["wall_s"] / steps)
        row.update(val_loss=res["loss_after"], val_ppl=res["ppl_after"],
                   ppl_vs_mha_pct=100 * (res["ppl_after"] / mha_ppl - 1), train_wall_s=res["wall_s"],
                   steps_per_s=res["steps_per_s"], tokens_per_s=tokens_per_step * res["steps_per_s"])
        del m, res
        gc.collect()
        return row, row["val_ppl"], ""

    first = (alphas[0], *configs[0])
    done = {}
    up_lr = uptrain_lrs[0]
    if len(uptrain_lrs) > 1:
        sweep = {}
        for lr in uptrain_lrs:
            row, ppl, why = uptrain_job(*first, lr)
            log.row(stage="lr_sweep" if ppl is not None else "skipped", elapsed_s=elapsed(), note=why, **row)
            if ppl is not None:
                sweep[lr] = row
        if sweep:
            up_lr = min(sweep, key=lambda lr: sweep[lr]["val_ppl"])
            done[first] = sweep[up_lr]
        print(f"[{elapsed():.0f}s] uptraining peak LR {up_lr:g} (validation ppl by LR: "
              + ", ".join(f"{lr:g}: {r['val_ppl']:.2f}" for lr, r in sweep.items()) + ")", flush=True)
    jobs = [(al, *c) for al in alphas for c in configs]
    if a.mha_control:
        jobs.insert(len(configs), (alphas[0], heads, "mha", ""))
    for job in jobs:
        row, ppl, why = (done[job], done[job]["val_ppl"], "") if job in done else uptrain_job(*job, up_lr)
        stage = "skipped" if ppl is None else ("mha_control" if job[2] == "mha" else "uptrained")
        log.row(stage=stage, elapsed_s=elapsed(), note=why, **row)

    # ---- 5. why convert: decode attention time and KV memory at this model's shapes, MHA vs GQA vs MQA
    if cuda:
        for g in sorted({heads, *groups}, reverse=True):
            try:
                d = decode_speed(layers, heads, head_dim, g)
            except Exception as exc:  # a measurement failure must not lose the perplexity results
                print(f"decode speed G={g} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            log.row(stage="decode_speed", num_kv_heads=g, method="", grouping="", alpha="", steps="",
                    kv_bytes_per_token=kvb(g), elapsed_s=elapsed(), note="batch 128 x 2048 cached tokens, page 16",
                    **d, **base)

    plot(out / "gqa_results.csv", out / "gqa_ppl.png", heads)
    shutil.rmtree(work, ignore_errors=True)
    print(f"[{elapsed():.0f}s] done: {out / 'gqa_results.csv'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
