"""Host profile of ONE plugin attention call in a decode step (q_len = 1 by default), piece by piece.

A decode step of a 16-layer model makes 16 such calls; at B=1 the GPU work of each is a few microseconds, so the
host time of the call *is* the cost. This script builds the tensors transformers hands the attention function in
a Llama-style decode step (query ``[B, Hq, q_len, D]`` as the transposed view rotary embeddings produce, key/value
``[B, Hkv, ctx, D]`` fresh from the cache's ``torch.cat``, a left-padding key mask with ``--padded``) and times
``plugin_attention`` with ``time.perf_counter`` (the device synchronised before each call, outside the timed part):

    call            plugin_attention, unwrapped (the true host cost of one call)
    wall            back-to-back calls, no sync in between, per call (max of host and device time)
    pieces (inclusive medians per call, from a second pass with every piece wrapped by a timer, ~0.3 us each):
      describe_call     transformers' kwargs -> AttentionCall (incl. segments from the mask)
      segments          segments_from_key_mask (memoised across the layers of a step: ~once per step)
      ops.attention     the op's Python wrapper (checks) incl. the custom op
      custom_op         torch.library dispatch incl. its body
      flash_body        flash_attn_forward (host part, incl. the launch)
      config_pick       configs.pick (a dict lookup: never tunes unless HF_ATTN_PLUGIN_AUTOTUNE=1)
      tma_ready/unit_last  K/V/Q stride checks (and copies: 'copies' counts calls that returned a new tensor)
      scratch_alloc     _ensure_scratch_allocator
      launch_flash      the Triton launch of the flash forward (JITFunction.run)
      decode_route      hf_attn_plugin.decode_ops (the GQA-packed split-K route), when present and enabled
      launch_paged      its Triton launch (one: split-K is merged in the same kernel)
    derived: dispatcher = custom_op - flash_body; glue = call - describe_call - ops.attention - decode_route

``--mock-launch`` replaces every Triton launch by a no-op, so that the host cost of everything around the launches
can be measured on a CPU machine (``HF_ATTN_PLUGIN_BACKEND=triton TRITON_INTERPRET=1 ... --device cpu --dtype
float32``; outputs are garbage then). ``--impl flash`` forces the old path (``HF_ATTN_PLUGIN_DECODE=0``),
``--impl decode`` the new route (when the call qualifies), ``--impl both`` (default) runs both in one process.
``--torch-profiler`` also writes torch.profiler's CPU table (self time, top 40 ops) per case.

GPU:  python benchmarks/profile_decode.py --out DIR                       (B=1, ctx 512/4k/32k, Llama-1B heads)
      python benchmarks/profile_decode.py --out DIR --batch 4 --padded --torch-profiler
CPU (host cost of our glue around the reference math):
      HF_ATTN_PLUGIN_BACKEND=reference python benchmarks/profile_decode.py --out DIR --device cpu --ctx 512

Writes ``DIR/profile_decode.csv`` (one row per impl, case and piece: us per attention call).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import time

import torch
from common import sync
from host_overhead_generate_batch import Timers

from hf_attn_plugin import ops
from hf_attn_plugin.integration import attention as attention_module

try:  # the GQA-packed decode route (issue 15 item 4); absent in older trees
    from hf_attn_plugin import decode_ops
except ImportError:  # pragma: no cover
    decode_ops = None


class LlamaAttention(torch.nn.Module):
    """Stands in for the model's attention module: plugin_attention reads ``is_causal`` and the class name."""

    is_causal = True


def make_inputs(batch, ctx, q_len, heads_q, heads_kv, head_dim, dtype, device, padded):
    """What transformers passes in a decode step: q as rotary's output transposed, K/V fresh from torch.cat."""
    q = torch.randn(batch, heads_q, q_len, head_dim, dtype=dtype, device=device)  # rotary: contiguous [B,H,S,D]
    k = torch.randn(batch, heads_kv, ctx, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads_kv, ctx, head_dim, dtype=dtype, device=device)
    mask = None
    if padded and batch > 1:  # left padding: row b starts at b * 7 (plugin_mask's key mask)
        starts = torch.arange(batch, device=device) * 7
        mask = torch.arange(ctx, device=device)[None, :] >= starts[:, None]
    position_ids = torch.full((batch, q_len), ctx - q_len, device=device, dtype=torch.long)
    return q, k, v, mask, position_ids


def host_times(fn, calls, device):
    """Per-call host seconds, the device drained before each call (outside the timed part)."""
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def wall_per_call(fn, calls, device):
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def wrap_pieces(timers: Timers, copies: dict) -> None:
    from hf_attn_plugin.kernels import configs, flash

    timers.wrap(attention_module, "describe_call", "describe_call")
    timers.wrap(attention_module, "segments_from_key_mask", "segments")
    for name in ("attention", "attention_trusted"):  # the integration calls the trusted form where it exists
        if hasattr(ops, name):
            timers.wrap(ops, name, "ops.attention")
    timers.wrap(ops, "_attention_fwd", "custom_op")
    timers.wrap(flash, "flash_attn_forward", "flash_body")
    timers.wrap(configs, "pick", "config_pick")
    timers.wrap(flash, "_ensure_scratch_allocator", "scratch_alloc")
    timers.wrap(flash._attn_fwd, "run", "launch_flash")
    for name in ("tma_ready", "_unit_last"):  # count the calls that copied
        original = getattr(flash, name)

        def counted(x, _original=original, _name=name):
            y = _original(x)
            if y.data_ptr() != x.data_ptr():
                copies[_name] = copies.get(_name, 0) + 1
            return y

        setattr(flash, name, counted)
        timers._undo.append((flash, name, True, original))
        timers.wrap(flash, name, name)
    if decode_ops is not None:
        from hf_attn_plugin.kernels import paged

        timers.wrap(decode_ops, "attention", "decode_route")
        timers.wrap(paged._paged_attention_kernel, "run", "launch_paged")


def mock_launches() -> None:
    """Every attention kernel's launch returns at once (for measuring the host work around it off a GPU)."""
    from hf_attn_plugin.kernels import flash, paged

    for kernel in (flash._attn_fwd, paged._paged_attention_kernel):
        kernel.run = lambda *args, **kwargs: None


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def profile_case(args, impl, batch, ctx, device, dtype, writer, out_dir):
    q4, k4, v4, mask, position_ids = make_inputs(batch, ctx, args.q_len, args.heads_q, args.heads_kv, args.head_dim,
                                                 dtype, device, args.padded)
    query = q4  # [B, Hq, Sq, D], as transformers passes it
    module = LlamaAttention()

    def call():
        return attention_module.plugin_attention(module, query, k4, v4, mask, dropout=0.0,
                                                 scaling=args.head_dim ** -0.5, position_ids=position_ids,
                                                 use_cache=True)

    route_env = "1" if impl == "decode" else "0"
    with env("HF_ATTN_PLUGIN_DECODE", route_env), torch.no_grad():
        for _ in range(args.warmup):  # compiles, tunes the length bucket
            call()
        sync(device)
        host = host_times(call, args.calls, device)
        wall = wall_per_call(call, args.calls, device)

        timers, copies = Timers(), {}
        wrap_pieces(timers, copies)
        per_call = []  # per call: inclusive seconds of each piece (medians below: robust to a busy host)
        try:
            for _ in range(args.calls):
                before = dict(timers.seconds)
                host_times(call, 1, device)
                per_call.append({label: sec - before.get(label, 0.0) for label, sec in timers.seconds.items()})
        finally:
            timers.restore()

        if args.torch_profiler:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    call()
                sync(device)
            name = f"profile_decode_torch_{impl}_b{batch}_ctx{ctx}.txt"
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))

    n = args.calls
    pieces = {label: 1e6 * statistics.median(c.get(label, 0.0) for c in per_call) for label in timers.seconds}
    rows = [("call", 1e6 * statistics.median(host), 1), ("call_mean", 1e6 * statistics.mean(host), 1),
            ("wall", 1e6 * wall, 1)]
    rows += [(label, value, timers.calls[label] / n) for label, value in sorted(pieces.items())]
    derived = {
        "dispatcher": pieces.get("custom_op", 0.0) - pieces.get("flash_body", 0.0),
        "glue": 1e6 * statistics.median(host) - pieces.get("describe_call", 0.0) - pieces.get("ops.attention", 0.0)
        - pieces.get("decode_route", 0.0),
    }
    rows += [(label, value, "") for label, value in derived.items()]
    rows += [(f"copies.{name}", count / n, "") for name, count in copies.items()]
    for piece, value, per_call in rows:
        writer.writerow(dict(impl=impl, batch=batch, ctx=ctx, q_len=args.q_len, heads_q=args.heads_q,
                             heads_kv=args.heads_kv, head_dim=args.head_dim, dtype=str(dtype).split(".")[-1],
                             padded=int(bool(mask is not None)), piece=piece, us_per_call=round(value, 2),
                             times_per_call=per_call, device=device.type))
    print(f"\n{impl:7s} B={batch} ctx={ctx} q_len={args.q_len} padded={mask is not None}")
    for piece, value, per_call in rows:
        print(f"  {piece:18s} {value:9.2f} us   x{per_call}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for profile_decode.csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", choices=("flash", "decode", "both"), default="both")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--ctx", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--q-len", type=int, default=1)
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--padded", action="store_true", help="left-padded batch (B > 1): segments from a key mask")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--torch-profiler", action="store_true")
    parser.add_argument("--mock-launch", action="store_true", help="Triton launches become no-ops (host cost only)")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    if args.mock_launch:
        mock_launches()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    impls = ("flash", "decode") if args.impl == "both" else (args.impl,)
    if decode_ops is None:
        impls = ("flash",)
    fields = ["impl", "batch", "ctx", "q_len", "heads_q", "heads_kv", "head_dim", "dtype", "padded", "piece",
              "us_per_call", "times_per_call", "device"]
    with open(os.path.join(args.out, "profile_decode.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for batch in args.batch:
            for ctx in args.ctx:
                for impl in impls:
                    profile_case(args, impl, batch, ctx, device, dtype, writer, args.out)
                    f.flush()


if __name__ == "__main__":
    main()
