#!/usr/bin/env python
"""Paged decode (and chunked-prefill) benchmark: our Triton kernels vs SDPA on a contiguous cache.

Decode: bf16, D=128, Hq=32 / Hkv=8, page 16, block tables shuffled (pages scattered over the pool).
Bytes = K+V of every cached token read once + q + out. Reported as TB/s and as a fraction of the
device-to-device copy bandwidth measured in the same process (bytes read + written). Timed with
``triton.testing.do_bench_cudagraph`` (median), the way a serving loop replays decode steps.

    python benchmarks/bench_paged.py --out /tmp/bench            # CSV + PNG into --out
    python benchmarks/bench_paged.py --out /tmp/bench --sweep    # also sweep tiles / splits

Every decode case also runs the split-K study (rows ``impl=split_study``): the default (grid from
shapes, piece length chosen in the kernel from ``seq_lens``) against the fixed-piece rule it replaced
(pieces of ``min_split_keys``, old default grid), the fixed rule with 32 splits, and the kernel's rule
with other "programs that fill the GPU" targets; it prints how many pieces each sequence used.
"""

from __future__ import annotations

import argparse
import csv
import math
import os

import torch
import torch.nn.functional as F
from common import bench_ms, copy_bandwidth, print_device, pyplot, run_meta, write_rows

from hf_attn_plugin.kernels import paged as kernels
from hf_attn_plugin.kernels.configs import Config

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16


def bench(fn) -> float:
    """Median milliseconds of ``fn`` replayed in a CUDA graph."""
    return bench_ms(fn, rep=50, cuda_graph=True)


class DecodeCase:
    def __init__(self, name: str, lens: list[int], width: int | None = None):
        self.name, self.lens = name, lens
        counts = [-(-n // PAGE) for n in lens]
        total = sum(counts)
        self.k_pool = torch.randn(total, PAGE, HKV, D, device="cuda", dtype=DT)
        self.v_pool = torch.randn_like(self.k_pool)
        perm = torch.randperm(total, device="cuda", dtype=torch.int32)
        width = width or max(counts)
        self.block_tables = torch.zeros(len(lens), width, device="cuda", dtype=torch.int32)
        start = 0
        for b, c in enumerate(counts):
            self.block_tables[b, :c] = perm[start : start + c]
            start += c
        self.seq_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
        self.q = torch.randn(len(lens), HQ, D, device="cuda", dtype=DT)
        self.bytes = sum(lens) * HKV * D * 2 * DT.itemsize + 2 * self.q.numel() * DT.itemsize

    def ours(self, num_splits: int = 0, config=None):
        return lambda: kernels.paged_attention(
            self.q, self.k_pool, self.v_pool, self.block_tables, self.seq_lens, None, 1, None, None, D**-0.5,
            True, 0, 0.0, num_splits, config)

    def contiguous(self):
        """[B, Hkv, max_len, D] K/V (padded to the longest sequence), and q as [B, Hq, 1, D]."""
        longest = max(self.lens)
        pages = self.block_tables[:, : -(-longest // PAGE)].long()
        k = self.k_pool[pages].flatten(1, 2)[:, :longest].transpose(1, 2).contiguous()
        v = self.v_pool[pages].flatten(1, 2)[:, :longest].transpose(1, 2).contiguous()
        return self.q.unsqueeze(2), k, v

    def default_splits(self) -> int:
        """The split-K grid the kernels launch for this case (its plan: the decode config's minimum piece)."""
        plan = kernels.Plan(self.q.shape, self.q.dtype, self.q.device, self.k_pool.shape, self.block_tables,
                            self.seq_lens, None, 1, None)
        return plan.launch(True, False, False, False).num_splits

    def old_default_splits(self) -> int:
        """The grid of the fixed-piece rule: no split once (sequence, head) programs fill every SM twice,
        else ~4 programs per SM; at least capacity / 4096; at most capacity / 256 and 128."""
        sms = torch.cuda.get_device_properties(self.q.device).multi_processor_count
        programs = len(self.lens) * HKV
        capacity = self.block_tables.shape[1] * PAGE
        occupancy = 1 if programs >= 2 * sms else -(-4 * sms // programs)
        return max(1, min(max(occupancy, -(-capacity // 4096)), capacity // 256, 128))

    def pieces(self, num_splits: int = 0, config=None) -> dict[int, list[int]]:
        """Split-K pieces the kernel used, by sequence length: {length: [pieces of each such sequence]}."""
        _, partials = kernels.paged_attention(
            self.q, self.k_pool, self.v_pool, self.block_tables, self.seq_lens, None, 1, None, None, D**-0.5,
            True, 0, 0.0, num_splits, config, return_partials=True)
        if partials is None:
            counts = [1] * len(self.lens)
        else:
            lse = partials[1][:, 0]
            counts = torch.where(lse[:, 0] == math.inf, 1, (lse > -math.inf).sum(-1)).tolist()
        out: dict[int, list[int]] = {}
        for n, c in zip(self.lens, counts):
            out.setdefault(n, []).append(c)
        return out


def describe_pieces(pieces: dict[int, list[int]]) -> str:
    """'32768:29 8192:7 <=2047:1' style summary (lengths sharing a piece count are grouped)."""
    by_count: dict[int, list[int]] = {}
    for n, counts in pieces.items():
        for c in counts:
            by_count.setdefault(c, []).append(n)
    return " ".join(f"{min(ns)}..{max(ns)}:{c}" if min(ns) != max(ns) else f"{ns[0]}:{c}"
                    for c, ns in sorted(by_count.items(), reverse=True))


def split_study(case: DecodeCase) -> list[tuple[str, int, Config | None]]:
    """(label, num_splits, config) points comparing the split-K rules on one case."""
    sms = torch.cuda.get_device_properties(case.q.device).multi_processor_count
    fixed = Config(16, 64, 4, 2, min_split_keys=1024, split_programs=2**30)  # piece length = min_split_keys
    old = case.old_default_splits()
    points = [("fixed pieces, old default grid", old, fixed), ("fixed pieces, 32 splits", 32, fixed),
              ("kernel rule, 32 splits", 32, None)]
    points += [(f"kernel rule, fill {k}/SM", 0, Config(16, 64, 4, 2, min_split_keys=1024, split_programs=k * sms))
               for k in (2, 8)]
    return points


def sdpa_variants(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        try:
            fn()
            torch.cuda.synchronize()
            out[name] = fn
        except Exception as exc:  # a backend may refuse the shape: report, don't stop
            print(f"  {name}: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true", help="sweep tiles/warps/stages/splits as well")
    ap.add_argument("--replot", metavar="CSV", help="only redraw the PNG from a CSV this script wrote")
    ap.add_argument("--no-prefill", action="store_true", help="skip the chunked-prefill benchmark")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            rows = list(csv.DictReader(f))
        copy_bw = float(next(r["tbps"] for r in rows if r["case"] == "copy")) * 1e12
        plot(rows, copy_bw, os.path.join(args.out, "paged_decode.png"))
        return
    torch.manual_seed(0)
    print_device()
    meta = run_meta("gpu", "torch", "triton", "date", date_format="%Y-%m-%dT%H:%M")
    rows: list[dict] = []
    copy_bw = copy_bandwidth(2**31, rep=200)  # 2 GiB (a CUDA graph would run the copy on a copy engine: 2.77 TB/s)
    print(f"{meta}\ndevice copy bandwidth: {copy_bw / 1e12:.3f} TB/s")
    rows.append(dict(meta, case="copy", impl="torch_copy", config="", batch=0, tokens=0, bytes=0, ms=0,
                     tbps=copy_bw / 1e12, frac_copy=1.0))

    gen = torch.Generator().manual_seed(1)
    skew = [32768, 32768] + [8192] * 6 + torch.randint(128, 2048, (56,), generator=gen).tolist()

    def cfg(block_q, block_n, num_warps, num_stages, min_split_keys=1024):  # decode: block_q is 1 (one token)
        return Config(16 * block_q, block_n, num_warps, num_stages, min_split_keys=min_split_keys)

    # Sweep points per case (config, splits); the first full sweep (10 tile configs x 4 split counts,
    # NOTES_paged.md) settled the default at 64-key tiles, 4 warps, 2 stages.
    cases = [
        (DecodeCase("B64_ctx4k", [4096] * 64),
         [(cfg(1, bn, 4, st), 1) for bn, st in ((64, 2), (64, 3), (128, 2))] + [(cfg(1, 64, 4, 2), 2)]),
        (DecodeCase("B1_ctx128k", [131072]),
         [(cfg(1, bn, 4, st), s) for bn, st in ((64, 2), (64, 3), (128, 2)) for s in (32, 64)]),
        (DecodeCase("B64_skewed", skew),
         [(cfg(1, bn, 4, 2, mk), s) for bn in (64, 128) for mk in (1024, 2048) for s in (8, 16, 32)]),
    ]

    def record(case, impl, config, ms):
        tbps = case.bytes / (ms * 1e-3) / 1e12
        rows.append(dict(meta, case=case.name, impl=impl, config=config, batch=len(case.lens), tokens=sum(case.lens),
                         bytes=case.bytes, ms=ms, tbps=tbps, frac_copy=tbps * 1e12 / copy_bw))
        return tbps

    summary = []
    for case, sweep in cases:
        print(f"== {case.name}: B={len(case.lens)} tokens={sum(case.lens)} bytes={case.bytes / 1e9:.3f} GB")
        q4, k, v = case.contiguous()
        ref = F.scaled_dot_product_attention(q4.float(), k.float(), v.float(), enable_gqa=True)[:, :, 0]
        if case.name == "B64_skewed":  # padded contiguous reference is wrong for short rows: use our reference
            from hf_attn_plugin.paged_ops import paged_attention_reference
            ref = paged_attention_reference(case.q.float(), case.k_pool.float(), case.v_pool.float(),
                                            case.block_tables, case.seq_lens, None, None, None, D**-0.5, True, 0, 0.0)
        out = case.ours()()
        err = (out.float() - ref).abs().max().item()
        print(f"  max |ours - ref| = {err:.2e}")
        assert err < 3e-2, err
        default_splits = case.default_splits()
        ms = bench(case.ours())
        ours = record(case, "ours", f"default splits={default_splits}", ms)
        print(f"  ours default (splits={default_splits}): {ms * 1e3:8.1f} us  {ours:.3f} TB/s  "
              f"{ours * 1e12 / copy_bw:.3f} x copy  pieces {describe_pieces(case.pieces())}")
        best = (ours, f"default splits={default_splits}")
        for label, s, config in split_study(case):
            ms = bench(case.ours(s, config))
            tb = record(case, "split_study", f"{label} splits={s or default_splits}", ms)
            print(f"  {label + f' (splits={s or default_splits})':<44} {ms * 1e3:8.1f} us  {tb:.3f} TB/s  "
                  f"pieces {describe_pieces(case.pieces(s, config))}")
        if args.sweep:
            for config, s in sweep:
                ms = bench(case.ours(s, config))
                tb = record(case, "ours_sweep", f"{config} splits={s}", ms)
                if tb > best[0]:
                    best = (tb, f"{config} splits={s}")
            print(f"  ours best: {best[0]:.3f} TB/s  {best[0] * 1e12 / copy_bw:.3f} x copy  [{best[1]}]")
        best_sdpa = 0.0
        for name, fn in sdpa_variants(q4, k, v).items():
            ms = bench(fn)
            tb = record(case, name + ("_padded" if case.name == "B64_skewed" else ""), "contiguous", ms)
            best_sdpa = max(best_sdpa, tb)
            print(f"  {name}: {ms * 1e3:8.1f} us  {tb:.3f} TB/s (useful bytes)")
        summary.append((case.name, ours, ours * 1e12 / copy_bw, best[0], best_sdpa, ours / best_sdpa if best_sdpa else math.nan))
        del q4, k, v
        torch.cuda.empty_cache()

    prefill_rows = [] if args.no_prefill else bench_prefill(meta)
    rows.extend(prefill_rows)

    write_rows(os.path.join(args.out, "paged_decode.csv"), rows)
    plot(rows, copy_bw, os.path.join(args.out, "paged_decode.png"))
    print(f"\ncopy bandwidth {copy_bw / 1e12:.3f} TB/s")
    print(f"{'case':<12} {'ours TB/s':>10} {'x copy':>7} {'best TB/s':>10} {'SDPA TB/s':>10} {'ours/SDPA':>10}")
    for name, tb, frac, best, sdpa, ratio in summary:
        print(f"{name:<12} {tb:10.3f} {frac:7.3f} {best:10.3f} {sdpa:10.3f} {ratio:10.3f}")
    for r in prefill_rows:
        print(f"prefill {r['impl']:<14} {r['config']:<40} {r['ms'] * 1e3:8.1f} us {r['tflops']:7.1f} TFLOP/s")


def bench_prefill(meta) -> list[dict]:
    """Chunked prefill: 4 sequences x 4096 new tokens after a 4096-token cached prefix (causal)."""
    batch, new, past = 4, 4096, 4096
    total = past + new
    pages_per_seq = total // PAGE
    k_pool = torch.randn(batch * pages_per_seq, PAGE, HKV, D, device="cuda", dtype=DT)
    v_pool = torch.randn_like(k_pool)
    bt = torch.randperm(batch * pages_per_seq, device="cuda", dtype=torch.int32).view(batch, pages_per_seq)
    seq_lens = torch.full((batch,), total, device="cuda", dtype=torch.int32)
    cu = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * new
    q = torch.randn(batch * new, HQ, D, device="cuda", dtype=DT)
    flops = 4 * batch * HQ * D * (new * past + new * new / 2)
    rows = []
    # rows = query tokens x the 4 heads of a group (32/8): 16 tokens = 64 rows
    for cfg in (None, Config(64, 128, 4, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 4)):
        fn = lambda cfg=cfg: kernels.paged_attention(q, k_pool, v_pool, bt, seq_lens, cu, new, None, None, D**-0.5,
                                                     True, 0, 0.0, 1, cfg)
        ms = bench_ms(fn, rep=100)
        rows.append(dict(meta, case="prefill_4x4096_after_4096", impl="ours", config=str(cfg or "default"),
                         batch=batch, tokens=batch * total, bytes=0, ms=ms, tbps=0, frac_copy=0,
                         tflops=flops / (ms * 1e-3) / 1e12))
    pages = bt.long()
    k = k_pool[pages].flatten(1, 2).transpose(1, 2).contiguous()
    v = v_pool[pages].flatten(1, 2).transpose(1, 2).contiguous()
    q4 = q.view(batch, new, HQ, D).transpose(1, 2)
    # bottom-right causal over [past + new] keys == a boolean mask; SDPA's is_causal is top-left, so time it on
    # the new x new block plus a full new x past block (same FLOPs, the best SDPA can do for this shape).
    ms = bench_ms(lambda: (F.scaled_dot_product_attention(q4, k[:, :, past:], v[:, :, past:], is_causal=True,
                                                          enable_gqa=True),
                           F.scaled_dot_product_attention(q4, k[:, :, :past], v[:, :, :past], enable_gqa=True)),
                  rep=100)
    rows.append(dict(meta, case="prefill_4x4096_after_4096", impl="sdpa_contiguous_2calls", config="default",
                     batch=batch, tokens=batch * total, bytes=0, ms=ms, tbps=0, frac_copy=0,
                     tflops=flops / (ms * 1e-3) / 1e12))
    return rows


def plot(rows, copy_bw, path) -> None:
    plt = pyplot()
    if plt is None:
        return
    cases = [c for c in dict.fromkeys(r["case"] for r in rows) if c not in ("copy",) and not c.startswith("prefill")]
    impls = ["ours"] + sorted({r["impl"] for r in rows if r["impl"].startswith("sdpa") and r["case"] in cases})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / (len(impls) + 1)
    for i, impl in enumerate(impls + ["ours_best"]):
        vals = []
        for c in cases:
            if impl == "ours_best":
                cand = [float(r["tbps"]) for r in rows
                        if r["case"] == c and r["impl"] in ("ours", "ours_sweep", "split_study")]
            else:
                cand = [float(r["tbps"]) for r in rows if r["case"] == c and r["impl"] == impl]
            vals.append(max(cand) if cand else 0.0)
        ax.bar([x + i * width for x in range(len(cases))], vals, width, label=impl)
    ax.axhline(copy_bw / 1e12, color="k", ls="--", lw=1, label="device copy")
    ax.set_xticks([x + width * len(impls) / 2 for x in range(len(cases))], cases)
    ax.set_ylabel("TB/s (useful bytes)")
    ax.set_title(f"Paged decode, bf16, D={D}, Hq={HQ}/Hkv={HKV}, page {PAGE} — {rows[0]['gpu']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
