"""Decode-route launch configs on the GPU: tiles x pipeline stages x split targets, beside SDPA cuDNN, one process.

The decode route (:mod:`hf_attn_plugin.decode_ops`) reads a contiguous cache as pages of one position. Since the
kernel computes those pages instead of loading them from a block table, Triton's pipeliner multi-buffers the K/V
loads (``num_stages - 1`` buffers; with the table's dependent loads it kept one at any ``num_stages``: compiled for
sm_90 on a CPU machine), so the decode configs are worth re-sweeping. Rows per shape:

* ``table``: the route as before (an ``arange`` block table, the shipped config) -- the baseline;
* ``BN,st,sN``: no table, ``BLOCK_N`` keys per tile, 4 warps, stages, a split-K grid of N (``auto``: the rule's);
* ``pagedP,BN,st``: the same K/V in a paged pool (``P``-position pages, shuffled), read through a block table;
* ``sdpa_cudnn``: ``F.scaled_dot_product_attention`` with the cuDNN backend (``enable_gqa``).

Times are CUDA-graph replays (``do_bench_cudagraph`` median, the compiled static route's view);
``copy_frac`` = K+V bytes / time over the device's copy bandwidth (same process).

    python benchmarks/probe_decode_configs.py --out DIR [--sweep]     # ~1 min, with --sweep ~3 min on an H200
    python benchmarks/probe_decode_configs.py --out DIR --mla         # DeepSeek shapes: decode route vs flash path

``--mla``: multi-head latent attention shapes instead (DeepSeek-V2/V3: K 192 wide, V 128, one KV head per query
head; the cache laid out as transformers' DeepSeek attention leaves it: K ``[B, H, S]``-major, V the value half of
the kv projection's ``[B, S, H, 256]`` output): the decode route (``route``), the flash path it replaced for these
calls (``flash``), and SDPA with its default backend choice (``sdpa``), each checked against SDPA's math backend.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from common import bench_ms, copy_bandwidth, print_device, run_meta, write_rows

from hf_attn_plugin import decode_ops
from hf_attn_plugin.kernels import paged
from hf_attn_plugin.kernels.configs import Config
from hf_attn_plugin.kernels.params import AttentionParams

PAGE = 16
SHAPES = [  # batch, context, query heads, KV heads, head dim
    (1, 32768, 32, 8, 64), (1, 4096, 32, 8, 64), (16, 32768, 32, 8, 64), (64, 4096, 32, 8, 64),
    (1, 32768, 32, 8, 128), (16, 4096, 32, 8, 128),
]
MLA_SHAPES = [  # batch, context, heads (query = KV), head dim, value head dim
    (1, 4096, 16, 192, 128), (1, 32768, 16, 192, 128), (16, 4096, 16, 192, 128), (64, 2048, 16, 192, 128),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="the contiguous route's tiles x stages x split grids too")
    ap.add_argument("--mla", action="store_true", help="DeepSeek (MLA) shapes: decode route vs flash path vs SDPA")
    args = ap.parse_args()
    print_device()
    copy_gbps = copy_bandwidth() / 1e9
    meta = run_meta("date", "device")
    rows = []
    if args.mla:
        mla_rows(rows, meta, copy_gbps)
        SHAPES.clear()
    for batch, ctx, hq, hkv, dim in SHAPES:
        q = torch.randn(batch, 1, hq, dim, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, hkv, ctx, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        params = AttentionParams.create(dim, causal=True)
        rows_per_seq = decode_ops._virtual_pool_rows(k, v)
        index = decode_ops._index_tensors(batch, 1, ctx, None, q.device)
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              enable_gqa=True).transpose(1, 2)

        def plan_for(cfg, table: bool, num_splits: int = 0):
            plan = decode_ops._new_plan(q, k, v, rows_per_seq, index, num_splits)
            if table:  # the route before: an arange block table (the pool's pages are positions)
                rows = rows_per_seq[0]  # (K and V share it here)
                starts = torch.arange(0, batch * rows, rows, dtype=torch.int32, device=q.device)
                bt = starts[:, None] + torch.arange(ctx, dtype=torch.int32, device=q.device)[None, :]
                plan = paged.Plan(plan.q_shape, q.dtype, q.device, ((batch - 1) * rows + ctx, 1, hkv, dim),
                                  bt, plan.seq_lens, None, 1, None, 0, cfg)
            else:
                plan.config = cfg
            return plan

        def record(label, fn):
            try:
                err = (fn().float() - want.float()).abs().max().item()
                ms = bench_ms(fn, cuda_graph=True)
            except Exception as exc:  # noqa: BLE001  (a config that does not compile is a result)
                print(f"  {label}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                return
            gbps = kv_bytes / ms / 1e6
            rows.append(dict(meta, batch=batch, ctx=ctx, heads_q=hq, heads_kv=hkv, head_dim=dim, impl=label,
                             us=round(1e3 * ms, 2), gbps=round(gbps, 1), copy_frac=round(gbps / copy_gbps, 3),
                             max_err=err))
            print(f"  {label:>16}: {1e3 * ms:8.2f} us  {gbps:7.0f} GB/s  {gbps / copy_gbps:.3f} of copy  err {err:.2e}",
                  flush=True)

        print(f"B={batch} ctx={ctx} {hq}/{hkv} D={dim}  K+V {kv_bytes / 1e6:.1f} MB", flush=True)
        shipped = decode_ops._new_plan(q, k, v, rows_per_seq, index, 0).launch(True, False, False, False).cfg
        record("table", lambda p=plan_for(shipped, True): decode_ops._launch(q, k, v, rows_per_seq, p, params))
        record("shipped", lambda p=plan_for(None, False): decode_ops._launch(q, k, v, rows_per_seq, p, params))
        for bn, stages, splits in itertools.product((64, 128), (2, 3, 4), (0, 32, 128) if batch == 1 else (0,)):
            if not args.sweep:
                break
            if dim == 128 and bn == 128 and stages > 3:
                continue
            cfg = Config(16, bn, 4, stages, min_split_keys=2 * bn)
            record(f"{bn},{stages},s{splits or 'auto'}",
                   lambda p=plan_for(cfg, False, splits): decode_ops._launch(q, k, v, rows_per_seq, p, params))
        # A real paged cache (16-position pages, shuffled): the block-table path, whose tiles load the next tile's
        # page numbers (so 3+ stages multi-buffer K/V there too)
        pages_per_seq = ctx // PAGE
        perm = torch.randperm(batch * pages_per_seq, device=q.device)
        k_pool, v_pool = (torch.empty(batch * pages_per_seq, PAGE, hkv, dim, device=q.device, dtype=q.dtype)
                          for _ in range(2))
        k_pool[perm] = k.reshape(batch * pages_per_seq, PAGE, hkv, dim)
        v_pool[perm] = v.reshape(batch * pages_per_seq, PAGE, hkv, dim)
        tables = perm.view(batch, pages_per_seq).to(torch.int32)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=q.device)
        q3 = q.view(batch, hq, dim)
        for bn, stages in ((64, 2), (64, 3), (64, 4), (128, 2), (128, 3)):
            cfg = Config(16, bn, 4, stages, min_split_keys=2 * bn)
            record(f"paged{PAGE},{bn},{stages}",
                   lambda cfg=cfg: paged.paged_attention(q3, k_pool, v_pool, tables, seq_lens, None, 1, None, None,
                                                         params.scale, True, 0, 0.0, 0, cfg).view_as(q))
        record("sdpa_cudnn", lambda: _cudnn(q, k, v))
    if args.out:
        write_rows(f"{args.out}/decode_configs.csv", rows)


def mla_rows(rows: list, meta: dict, copy_gbps: float, device="cuda", dtype=torch.bfloat16, shapes=MLA_SHAPES,
             bench=bench_ms) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_attn_plugin import ops

    for batch, ctx, heads, dim, dim_v in shapes:
        q = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, heads, ctx, dim, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(batch, ctx, heads, 2 * dim_v, device=device, dtype=dtype)[..., dim_v:]
        kv_bytes = (k.numel() + v.numel()) * k.element_size()
        params = AttentionParams.create(dim, causal=True)
        q4, k4, v4 = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel(SDPBackend.MATH):
            want = F.scaled_dot_product_attention(q4.float(), k4.float(), v4.float()).transpose(1, 2)
        impls = {"route": lambda: decode_ops.attention(q, k, v, params),
                 "flash": lambda: ops.attention_trusted(q, k, v, params),
                 "sdpa": lambda: F.scaled_dot_product_attention(q4, k4, v4).transpose(1, 2)}
        print(f"MLA B={batch} ctx={ctx} {heads} heads D={dim} Dv={dim_v}  K+V {kv_bytes / 1e6:.1f} MB", flush=True)
        for name, fn in impls.items():
            try:
                err = (fn().float() - want).abs().max().item()
                ms = bench(fn, cuda_graph=True)
            except Exception as exc:  # noqa: BLE001  (an implementation without a kernel here is a result)
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            gbps = kv_bytes / ms / 1e6
            rows.append(dict(meta, batch=batch, ctx=ctx, heads_q=heads, heads_kv=heads, head_dim=dim,
                             head_dim_v=dim_v, impl=f"mla_{name}", us=round(1e3 * ms, 2), gbps=round(gbps, 1),
                             copy_frac=round(gbps / copy_gbps, 3), max_err=err))
            print(f"  {name:>6}: {1e3 * ms:8.2f} us  {gbps:7.0f} GB/s  {gbps / copy_gbps:.3f} of copy  err {err:.2e}",
                  flush=True)


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              enable_gqa=True).transpose(1, 2)


if __name__ == "__main__":
    main()
