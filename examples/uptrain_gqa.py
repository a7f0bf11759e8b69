#!/usr/bin/env python
"""Uptrain a (GQA-converted) causal LM with ``transformers.Trainer`` on the plugin's kernels.

The recipe (GQA paper, Ainslie et al. 2023): convert an MHA checkpoint with ``convert-to-gqa`` (mean-pooled
K/V heads), then continue training it for a small fraction (~5%) of its pretraining steps.

    convert-to-gqa ckpt/mha ckpt/gqa4 --num-kv-heads 4
    python examples/uptrain_gqa.py ckpt/gqa4 --out ckpt/gqa4-uptrained --max-steps 500
    accelerate launch --num_processes 2 examples/uptrain_gqa.py ckpt/gqa4 --out ckpt/gqa4-up --max-steps 500

What it does:
  * loads the checkpoint with ``attn_implementation="plugin"`` (Triton flash kernels on CUDA, the pure-PyTorch
    reference on CPU);
  * reads a local text dataset with ``datasets.load_dataset("text", data_files=..., sample_by="document")``
    (default: the Python standard library's own sources), tokenizes each document and cuts it into chunks of
    ``--seq-len`` tokens; a deterministic per-file split holds out the validation documents;
  * packs chunks padding-free with ``DataCollatorWithFlattening`` (one row per step, ``position_ids`` restart
    at each document: no FLOP is spent on padding, no token attends across documents);
  * trains with ``Trainer`` (bf16 autocast on GPU, cosine schedule with warmup, optional gradient checkpointing);
  * reports validation perplexity (token-weighted, exact) before and after; saves model + tokenizer.

The functions below are importable: ``benchmarks/gqa_experiment.py`` and ``tests/test_uptrain.py`` load this file
by its path and reuse them.
Multi-GPU: ``accelerate launch`` runs it with DDP (Trainer handles it; evaluation runs the same on every rank and
only rank 0 prints and saves). FSDP is untested.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import sysconfig
import time
import zlib

import torch

import hf_attn_plugin  # noqa: F401  (registers attn_implementation="plugin"; `pip install -e .` installs it)

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

EOS = "<|endoftext|>"

__all__ = [
    "require_train_extras", "stdlib_files", "split_files", "read_documents", "train_tokenizer", "chunk_token_ids", "tokenize_documents",
    "load_text_datasets", "build_llama", "load_model", "rope_in_autocast_dtype", "evaluate_perplexity",
    "make_training_args", "train", "uptrain", "main",
]


def require_train_extras(*modules: str) -> None:
    """Exit with an install hint when a module of the ``[train]`` extra is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"examples/uptrain_gqa.py needs {' and '.join(missing)} (the recipe's extras, not installed with the "
            "package): pip install -e \".[train]\"  (or: pip install accelerate datasets)"
        )


# --------------------------------------------------------------------------------------------------- data
def stdlib_files(max_files: int | None = None) -> list[str]:
    """The Python standard library's ``.py`` sources (real text nobody here wrote), sorted, no site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in f and "dist-packages" not in f and os.path.isfile(f)
    )
    return files[:max_files] if max_files else files


def split_files(files: list[str], val_percent: float = 5.0) -> tuple[list[str], list[str]]:
    """Deterministic held-out split by file (crc32 of the path relative to the common root)."""
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    train, val = [], []
    for f in files:
        h = zlib.crc32(os.path.relpath(f, root).encode()) % 10000
        (val if h < val_percent * 100 else train).append(f)
    if not val:  # tiny file lists: keep at least one validation document
        val.append(train.pop())
    return train, val


def read_documents(files: list[str]) -> list[str]:
    """Plain-Python reading (no ``datasets``), for places where it is not installed (e.g. the GPU machine)."""
    docs = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if text.strip():
            docs.append(text)
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 8192, max_chars: int = 8_000_000) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained with ``tokenizers`` on (a prefix of) ``texts``; saved with the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def sample():
        n = 0
        for t in texts:
            if n >= max_chars:
                return
            n += len(t)
            yield t

    tok.train_from_iterator(sample(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def chunk_token_ids(ids: list[int], seq_len: int, min_len: int = 16) -> list[list[int]]:
    """Cut one document's tokens into chunks of at most ``seq_len`` (a short tail under ``min_len`` is dropped)."""
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [c for c in chunks if len(c) >= min_len]


def tokenize_documents(tokenizer, texts: list[str], seq_len: int, min_len: int = 16) -> list[dict]:
    """Documents -> list of ``{"input_ids": [...]}`` chunks (a plain list works as a Trainer dataset)."""
    out = []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for ids in enc:
        out.extend({"input_ids": c} for c in chunk_token_ids(ids, seq_len, min_len))
    return out


def load_text_datasets(tokenizer, data_files: list[str] | None, seq_len: int, val_percent: float = 5.0,
                       max_files: int | None = None, num_proc: int | None = None):
    """``datasets`` path of the recipe: ``load_dataset("text", sample_by="document")`` + tokenize + chunk.

    ``data_files`` None means the standard library's sources. Returns ``(train, validation)`` datasets with one
    column, ``input_ids``.
    """
    require_train_extras("datasets")
    from datasets import load_dataset

    files = data_files or stdlib_files(max_files)
    train_files, val_files = split_files(files, val_percent)
    raw = load_dataset("text", data_files={"train": train_files, "validation": val_files}, sample_by="document")

    def tok_chunk(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [c for ids in enc for c in chunk_token_ids(ids, seq_len)]}

    ds = raw.map(tok_chunk, batched=True, remove_columns=["text"], num_proc=num_proc)
    return ds["train"], ds["validation"]


# -------------------------------------------------------------------------------------------------- model
def build_llama(vocab_size: int, hidden: int = 768, layers: int = 4, heads: int = 12, kv_heads: int | None = None,
                intermediate: int | None = None, max_positions: int = 2048, tie: bool = True,
                seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama decoder (MHA unless ``kv_heads`` says otherwise) using ``"plugin"``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or (8 * hidden // 3 // 64 + 1) * 64,
        max_position_embeddings=max_positions, tie_word_embeddings=tie, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    cfg._attn_implementation = "plugin"
    return rope_in_autocast_dtype(LlamaForCausalLM(cfg))


def rope_in_autocast_dtype(model) -> torch.nn.Module:
    """Make the rotary embedding return cos/sin in the autocast dtype, so q/k/v reach the kernels in bf16.

    Why: under ``Trainer(bf16=True)`` (autocast, fp32 master weights) Llama's rotary embedding returns cos/sin in
    the residual stream's dtype (fp32), so ``q * cos`` and ``k * cos`` are fp32 while ``v`` is bf16; the plugin
    then casts everything to ``k.dtype`` = fp32 and the Triton kernels run in fp32 (IEEE dots), not bf16. SDPA
    avoids this because autocast casts its inputs; the plugin's custom op has no autocast rule. This hook is the
    user-side workaround (no effect without autocast, e.g. on CPU).
    """
    inner = getattr(model, "model", model)
    rope = getattr(inner, "rotary_emb", None)
    if rope is None or getattr(rope, "_autocast_hook", False):
        return model

    def hook(mod, inputs, out):
        dev = out[0].device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            return tuple(o.to(dt) for o in out)
        return out

    rope.register_forward_hook(hook)
    rope._autocast_hook = True
    return model


def load_model(path: str | os.PathLike) -> torch.nn.Module:
    """Load a checkpoint with ``attn_implementation="plugin"`` (fp32 master weights; bf16 autocast on GPU)."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="plugin", dtype=torch.float32)
    return rope_in_autocast_dtype(model)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_perplexity(model, dataset, batch_size: int = 32, max_batches: int | None = None) -> dict:
    """Exact token-weighted validation NLL/perplexity over packed batches (same collator as training)."""
    collator = DataCollatorWithFlattening()
    dev = _device_of(model)
    was_training = model.training
    model.eval()
    nll, ntok = 0.0, 0
    n = len(dataset)
    for bi, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and bi >= max_batches:
            break
        batch = collator([dataset[i] for i in range(start, min(n, start + batch_size))])
        batch = {k: v.to(dev) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(**batch, use_cache=False).logits
        tgt = labels[:, 1:]
        lp = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
        nll += lp.item()
        ntok += int((tgt != -100).sum())
    model.train(was_training)
    loss = nll / max(ntok, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": ntok}


# ------------------------------------------------------------------------------------------------ training
def make_training_args(out_dir: str, max_steps: int, lr: float = 1e-3, batch_size: int = 64,
                       warmup_frac: float = 0.05, min_lr_rate: float = 0.1, weight_decay: float = 0.1,
                       gradient_checkpointing: bool = False, logging_steps: int = 10, seed: int = 0,
                       num_workers: int = 0, **extra) -> TrainingArguments:
    """The one schedule shape used for pretraining and uptraining: linear warmup, cosine to ``min_lr_rate``."""
    bf16 = torch.cuda.is_available()
    if gradient_checkpointing:  # renamed activation_checkpointing in transformers 5.2x; 5.17 knows only the old name
        fields = TrainingArguments.__dataclass_fields__
        extra["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    return TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": min_lr_rate},
        warmup_steps=max(1, round(warmup_frac * max_steps)), weight_decay=weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=bf16, use_cpu=not torch.cuda.is_available(),
        logging_steps=logging_steps, save_strategy="no",
        report_to="none", seed=seed, data_seed=seed, dataloader_num_workers=num_workers,
        remove_unused_columns=False, disable_tqdm=True, ddp_find_unused_parameters=False, **extra,
    )


class _Hook(TrainerCallback):
    """Calls ``fn(step, model)`` every ``every`` optimizer steps (e.g. validation perplexity during pretraining)."""

    def __init__(self, every: int, fn):
        self.every, self.fn = every, fn

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.every and state.global_step % self.every == 0:
            self.fn(state.global_step, model)


def train(model, train_dataset, args: TrainingArguments, hook_every: int = 0, hook=None) -> dict:
    """Trainer + padding-free packing. Returns losses logged, wall time and tokens/s."""
    trainer = Trainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=DataCollatorWithFlattening(),
        callbacks=[_Hook(hook_every, hook)] if hook else None,
    )
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    t0 = time.perf_counter()
    out = trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = args.max_steps * args.per_device_train_batch_size * args.world_size  # upper bound (chunks <= seq)
    return {"trainer": trainer, "losses": losses, "train_loss": out.training_loss, "wall_s": wall,
            "steps_per_s": args.max_steps / wall, "max_tokens_per_s": tokens / wall}


def uptrain(model, train_dataset, val_dataset, out_dir: str, max_steps: int, eval_batches: int | None = None,
            save: bool = True, tokenizer=None, eval_batch_size: int = 32, eval_before: bool = True,
            **train_kw) -> dict:
    """The recipe: perplexity before, Trainer uptraining, perplexity after, save (model + tokenizer)."""
    before = (evaluate_perplexity(model, val_dataset, batch_size=eval_batch_size, max_batches=eval_batches)
              if eval_before else {"ppl": float("nan"), "loss": float("nan")})
    args = make_training_args(out_dir, max_steps, **train_kw)
    res = train(model, train_dataset, args)
    after = evaluate_perplexity(model, val_dataset, batch_size=eval_batch_size, max_batches=eval_batches)
    if save:
        res["trainer"].save_model(out_dir)
        if tokenizer is not None and res["trainer"].is_world_process_zero():
            tokenizer.save_pretrained(out_dir)
    res.update(ppl_before=before["ppl"], ppl_after=after["ppl"], loss_before=before["loss"],
               loss_after=after["loss"], eval_tokens=after["tokens"])
    return res


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  convert-to-gqa ckpt/mha ckpt/gqa4 --num-kv-heads 4\n"
               "  python examples/uptrain_gqa.py ckpt/gqa4 --out ckpt/gqa4-up --max-steps 500 --seq-len 512\n"
               "  python examples/uptrain_gqa.py ckpt/gqa4 --out ckpt/gqa4-up --fraction 0.05 "
               "--pretrain-steps 20000 --data-files corpus/*.txt\n"
               "  accelerate launch --num_processes 2 examples/uptrain_gqa.py ckpt/gqa4 --out ckpt/gqa4-up "
               "--max-steps 500   (DDP)",
    )
    p.add_argument("model", help="checkpoint directory (e.g. the output of convert-to-gqa), with its tokenizer")
    p.add_argument("--out", required=True, help="where the uptrained model + tokenizer are saved")
    p.add_argument("--tokenizer", help="tokenizer directory if the checkpoint has none")
    p.add_argument("--data-files", nargs="*",
                   help="local text files, one document per file (default: the .py sources of Python's standard "
                        "library, a stand-in corpus present everywhere: pass your own text for real uptraining)")
    p.add_argument("--max-files", type=int, help="use only the first N files")
    p.add_argument("--val-percent", type=float, default=5.0, help="held-out files, percent (default 5)")
    p.add_argument("--seq-len", type=int, default=512, help="chunk length in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=64, help="chunks per device per step (default 64 = 32k tokens)")
    steps = p.add_mutually_exclusive_group(required=True)
    steps.add_argument("--max-steps", type=int, help="uptraining steps")
    steps.add_argument("--fraction", type=float, help="uptrain for this fraction of --pretrain-steps (paper: 0.05)")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps of the source model (for --fraction)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--eval-batches", type=int, default=None, help="limit validation batches (default: all)")
    p.add_argument("--num-proc", type=int, default=None, help="tokenization processes")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    require_train_extras("accelerate", "datasets")  # Trainer needs accelerate; the text files are read by datasets
    if a.fraction is not None and not a.pretrain_steps:
        p.error("--fraction needs --pretrain-steps")
    max_steps = a.max_steps if a.max_steps is not None else max(1, round(a.fraction * a.pretrain_steps))

    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if a.tokenizer is None and os.path.isdir(a.model) and not any(os.path.exists(os.path.join(a.model, f))
                                                                  for f in tok_files):
        p.error(f"{a.model} has no tokenizer files ({', '.join(tok_files)}): pass --tokenizer DIR, e.g. the "
                "directory of the checkpoint it was converted from")
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    model = load_model(a.model)
    train_ds, val_ds = load_text_datasets(tokenizer, a.data_files, a.seq_len, a.val_percent, a.max_files, a.num_proc)
    cfg = model.config
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(f"model {a.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads; "
              f"{len(train_ds)} train / {len(val_ds)} validation chunks; {max_steps} steps", flush=True)
    if torch.cuda.is_available():
        model.cuda(int(os.environ.get("LOCAL_RANK", 0)))
    res = uptrain(model, train_ds, val_ds, a.out, max_steps, eval_batches=a.eval_batches, tokenizer=tokenizer,
                  lr=a.lr, batch_size=a.batch_size, warmup_frac=a.warmup_frac,
                  gradient_checkpointing=a.gradient_checkpointing, seed=a.seed)
    if rank0:
        print(f"validation perplexity {res['ppl_before']:.3f} -> {res['ppl_after']:.3f} "
              f"({res['eval_tokens']} tokens); {res['steps_per_s']:.2f} steps/s; saved to {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
