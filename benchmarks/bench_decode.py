"""Decode attention (q_len = 1..16 over a KV cache) and single-stream generate(), every implementation in one process.

Two tables (issue 15 item 4, issue 17 items 1 and 5):

1. ``decode_kernels.csv``: one attention call of a decode step on Llama-1B heads (32 query / 8 KV heads, D=64,
   bf16) for B in ``--batch`` and contexts in ``--ctx``, K/V in transformers' layout (``[B, Hkv, S, D]`` memory):

   ``plugin``        hf_attn_plugin.decode_ops (the route "plugin" takes: GQA-packed, split-K, cache read in place)
   ``plugin_old_grid``  ``plugin`` with the split-K grid of the rule before session 7 forced (``ctx / 1024``
                     splits, pieces of >= 1024 keys): ``plugin`` vs this is the split rule's gain
   ``plugin_flash``  the flash op (the path "plugin" took before the route; ``HF_ATTN_PLUGIN_DECODE=0``)
   ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient``  torch SDPA with one backend forced (``enable_gqa``)
   ``eager``         transformers' eager attention: repeat_kv, matmul, fp32 softmax, matmul
   ``flex``          torch.compile(flex_attention) (``enable_gqa``; its decoding kernel for short queries)

   ``device_us``: ``triton.testing.do_bench`` median of eager calls. Only device time when the device is the
   bottleneck: a call of several launches whose host time exceeds its GPU time also counts the gaps between them
   (session 6's plugin rows at B=1: attention + split-K combine, ~50-100 us of host time between them on the
   H200). ``graph_us``: the calls replayed from a CUDA graph (``do_bench_cudagraph``): the device time proper,
   what the compiled static-cache route sees. ``splits``: the plugin's split-K grid (``kernels/paged.py``
   ``default_num_splits``). ``loop_us``: back-to-back calls, one sync at the end, per call (includes host time:
   what an eager decode step sees); ``gbps``: K+V bytes / ``graph_us`` (``device_us`` where a graph failed);
   ``copy_frac``: that over the device's copy bandwidth (``torch`` copy of a 1 GiB buffer, read + write).

2. ``decode_generate.csv``: ``model.generate()`` tokens/s at ``--gen-batch`` (default B=1) on a ~1B Llama-style
   random model in bf16 (hidden 2048, 16 layers, 32/8 heads, vocab 32000), ``--prompt`` tokens + ``--new`` greedy
   tokens (min_new_tokens = max_new_tokens), for ``plugin`` (route on), ``plugin_flash`` (route off), ``eager``,
   ``sdpa``: the same weights switched with ``set_attn_implementation``. ``tok_s`` = new tokens / generate wall time
   (prefill included, as in issue 17's table); ``decode_tok_s`` excludes the prefill (a 1-token generate timed
   apart). ``--long`` adds a 32k-token prompt + 256 new at B=1.

    python benchmarks/bench_decode.py --out DIR                       # both tables (~5-10 min on an H200)
    python benchmarks/bench_decode.py --out DIR --skip-generate --batch 1 8 64 --ctx 4096 32768 131072
    python benchmarks/bench_decode.py --out DIR --skip-generate --batch 1 16 64 --ctx 576 4096 32768 \
        --impls plugin plugin_old_grid sdpa_cudnn sdpa_flash          # the split rule (~1 min)
    python benchmarks/bench_decode.py --out DIR --skip-kernels --long
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F
from common import bench_ms, copy_bandwidth, device_name, llama_1b, print_device, timed, utc_now, write_rows

import hf_attn_plugin  # noqa: F401  (registers "plugin")
from hf_attn_plugin import decode_ops, ops

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 64


# --------------------------------------------------------------------------- kernel table
def eager_attention(q, k, v, scale):
    """transformers' eager_attention_forward (repeat_kv, fp32 softmax), q/k/v [B, H, S, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    sq, sk = q.shape[2], k.shape[2]
    if sq > 1:  # the chunk's queries are the cache's last sq positions (bottom-right causal)
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()


_FLEX = {}


def flex_fn():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # a shape each
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def implementations(q4, k4, v4, scale):
    """name -> zero-argument callable, on transformers' tensors (q4 [B, Hq, Sq, D], k4/v4 [B, Hkv, Sk, D])."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)  # the flash layout, no copies
    causal = q4.shape[2] > 1

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                # a q_len > 1 chunk at the end of the cache: bottom-right causal; SDPA's is_causal is top-left,
                # so short chunks use an explicit mask
                mask = None
                if causal:
                    sq, sk = q4.shape[2], k4.shape[2]
                    mask = torch.ones(sq, sk, dtype=torch.bool, device=q4.device).tril(sk - sq)
                return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)
        return run

    def flex():
        fn = flex_fn()
        if causal:
            from torch.nn.attention.flex_attention import create_block_mask

            sq, sk = q4.shape[2], k4.shape[2]
            block_mask = create_block_mask(lambda b, h, i, j: j <= i + (sk - sq), None, None, sq, sk)
            return lambda: fn(q4, k4, v4, block_mask=block_mask, scale=scale, enable_gqa=True)
        return lambda: fn(q4, k4, v4, scale=scale, enable_gqa=True)

    old_grid = max(1, min(k.shape[1] // 1024, 64))  # decode's grid before session 7: capacity / 1024 splits
    return {
        "plugin": lambda: decode_ops.attention(q, k, v, scale=scale, causal=True),
        "plugin_old_grid": lambda: decode_ops.attention(q, k, v, scale=scale, causal=True, num_splits=old_grid),
        "plugin_flash": lambda: ops.attention_trusted(q, k, v, scale=scale, causal=True),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "eager": lambda: eager_attention(q4, k4, v4, scale),
        "flex": flex,  # a factory: compiles on first use
    }


def plugin_splits(q, k) -> int:
    """The plugin's split-K grid for this call (the route's plan), q/k in the flash layout."""
    rows = decode_ops._virtual_pool_rows(k, k)
    index = decode_ops._index_tensors(q.shape[0], q.shape[1], k.shape[1], None, q.device)
    return decode_ops._new_plan(q, k, k, rows, index, 0).launch(True, False, False, False).num_splits


def loop_us(fn, calls=50) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def bench_kernels(args, writer, stamp):
    copy_gbps = copy_bandwidth(2**30) / 1e9
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    scale = HEAD_DIM ** -0.5
    for q_len in args.q_len:
        for batch in args.batch:
            for ctx in args.ctx:
                if batch * ctx > args.max_tokens:
                    continue
                torch.manual_seed(0)
                q4 = torch.randn(batch, HEADS_Q, q_len, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
                k4 = torch.randn(batch, HEADS_KV, ctx, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
                v4 = torch.randn_like(k4)
                kv_bytes = 2 * k4.numel() * k4.element_size()
                impls = implementations(q4, k4, v4, scale)
                want = None
                for name in args.impls:
                    row = dict(table="decode_kernels", impl=name, batch=batch, ctx=ctx, q_len=q_len, heads_q=HEADS_Q,
                               heads_kv=HEADS_KV, head_dim=HEAD_DIM, dtype="bfloat16", stamp=stamp,
                               device=device_name())
                    try:
                        fn = impls[name]() if name == "flex" else impls[name]
                        with torch.no_grad():
                            out = fn()
                            out = out.transpose(1, 2) if name.startswith(("sdpa", "flex")) else out
                            if want is None:
                                want = out.float()
                            err = (out.float() - want).abs().max().item()
                            device_ms = bench_ms(fn)
                            loop = loop_us(fn)
                            try:  # short: the graph unrolls rep / (one call's time) calls
                                graph_ms = bench_ms(fn, cuda_graph=True, rep=20)
                            except Exception as exc:  # recorded; the eager numbers stand
                                graph_ms = None
                                print(f"    {name}: no CUDA-graph timing ({type(exc).__name__}: {exc})", flush=True)
                        gbps = kv_bytes / ((graph_ms or device_ms) * 1e-3) / 1e9
                        row.update(device_us=round(1e3 * device_ms, 2),
                                   graph_us=round(1e3 * graph_ms, 2) if graph_ms else "", loop_us=round(loop, 2),
                                   gbps=round(gbps, 1), copy_frac=round(gbps / copy_gbps, 3),
                                   max_err_vs_plugin=f"{err:.3g}", error="")
                        if name == "plugin":
                            row.update(splits=plugin_splits(q4.transpose(1, 2), k4.transpose(1, 2)))
                    except Exception as exc:  # a backend that does not take this case: recorded, not fatal
                        row.update(device_us="", graph_us="", loop_us="", gbps="", copy_frac="", max_err_vs_plugin="",
                                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    writer(row)
                    splits = f"  {row['splits']} splits" if "splits" in row else ""
                    print(f"  q_len={q_len} B={batch:3d} ctx={ctx:7d} {name:15s} "
                          f"{row['device_us'] or '-':>9} us  graph {row['graph_us'] or '-':>9} us  "
                          f"loop {row['loop_us'] or '-':>9} us  {row['gbps'] or '-':>7} GB/s{splits}  {row['error']}",
                          flush=True)
                del q4, k4, v4, impls, want
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- generate table
def make_model(layers: int):
    return llama_1b(layers, max_position_embeddings=40960).eval()


@contextlib.contextmanager
def decode_route(on: bool):
    old = os.environ.get("HF_ATTN_PLUGIN_DECODE")
    os.environ["HF_ATTN_PLUGIN_DECODE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_ATTN_PLUGIN_DECODE")
        else:
            os.environ["HF_ATTN_PLUGIN_DECODE"] = old


def timed_generate(model, ids, new_tokens) -> float:
    seconds, out = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0))
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def bench_generate(args, writer, stamp):
    model = make_model(args.layers)
    cases = [(b, args.prompt, args.new) for b in args.gen_batch]
    if args.long:
        cases.append((1, 32768, 256))
    impls = [("plugin", "plugin", True), ("plugin_flash", "plugin", False), ("eager", "eager", None),
             ("sdpa", "sdpa", None)]
    for batch, prompt, new in cases:
        torch.manual_seed(1)
        ids = torch.randint(1, 32000, (batch, prompt), device="cuda")
        for name, impl, route in impls:
            if impl == "eager" and prompt > 8192:
                continue  # eager's [B, H, S, S] prefill scores do not fit
            model.set_attn_implementation(impl)
            with decode_route(bool(route)), torch.no_grad():
                timed_generate(model, ids, 8)  # warm-up: compiles, first-use tables
                prefill = min(timed_generate(model, ids, 1) for _ in range(2))
                total = min(timed_generate(model, ids, new) for _ in range(args.repeats))
            row = dict(table="decode_generate", impl=name, batch=batch, prompt=prompt, new_tokens=new,
                       seconds=round(total, 4), prefill_s=round(prefill, 4), tok_s=round(batch * new / total, 1),
                       decode_tok_s=round(batch * (new - 1) / max(total - prefill, 1e-9), 1),
                       ms_per_step=round(1e3 * (total - prefill) / (new - 1), 3), stamp=stamp,
                       device=device_name(), layers=args.layers)
            writer(row)
            print(f"  generate B={batch} {prompt}+{new} {name:13s} {row['tok_s']:8.1f} tok/s  "
                  f"decode {row['decode_tok_s']:8.1f} tok/s  {row['ms_per_step']:.2f} ms/step", flush=True)


class CsvWriter:
    """Collects rows; the CSV is rewritten after every row (a run cut short keeps what it measured)."""

    def __init__(self, path):
        self.path, self.rows = path, []

    def __call__(self, row):
        self.rows.append(row)
        write_rows(self.path, self.rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--ctx", type=int, nargs="+", default=[576, 4096, 32768, 131072])
    parser.add_argument("--q-len", type=int, nargs="+", default=[1])
    parser.add_argument("--max-tokens", type=int, default=64 * 32768, help="skip cases with B * ctx above this")
    parser.add_argument("--impls", nargs="+", default=["plugin", "plugin_flash", "sdpa_cudnn", "sdpa_flash",
                                                       "sdpa_efficient", "eager", "flex"])
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--long", action="store_true", help="also B=1 with a 32k-token prompt + 256 new")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py measures on a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    print_device()
    stamp = utc_now("%Y-%m-%dT%H:%MZ")
    if not args.skip_kernels:
        bench_kernels(args, CsvWriter(os.path.join(args.out, "decode_kernels.csv")), stamp)
    if not args.skip_generate:
        bench_generate(args, CsvWriter(os.path.join(args.out, "decode_generate.csv")), stamp)


if __name__ == "__main__":
    main()
