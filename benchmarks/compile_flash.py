"""Compile the Triton flash kernels for sm_90 on a machine without a GPU and report what ptxas says per config.

    /work/venv36/bin/python benchmarks/compile_flash.py --kind bwd_dkdv --dim 256 --configs "32,128,8,3,tp 64,32,8,2"

(a venv with Triton 3.6, the GPU image's, and a CPU torch). The kernels go through the real host launcher
(``flash.flash_attn_forward`` / ``flash_attn_backward`` on CPU tensors, the config forced for ``--kind``) with a
stand-in CUDA driver, so the signature, specialisation and constexprs are exactly a GPU launch's; each launch
compiles (``warmup``) instead of running. Per compiled kernel: registers, spill stores/loads (bytes), shared memory
and the MMA instructions in the PTX (``wgmma.mma_async`` shapes: Hopper; ``mma.sync``: Ampere's, what Triton falls
back to for tiles wgmma cannot take). A config is ``BLOCK_M,BLOCK_N,warps,stages[,ws][,tp]`` (``ws``: warp
specialised, ``tp``: two-pass dK/dV). This is how the two-pass dK/dV candidates of the D 256 bucket were chosen
(configs.py) before any GPU time was spent.

``--kind paged_decode`` compiles the paged attention kernel of one decode step instead (``--page-size``: 0 for the
decode route's contiguous cache, else a block-table pool): its shared memory shows how many K/V buffers Triton's
pipeliner keeps (``num_stages - 1`` once no K/V address waits on a load of its own iteration; NOTES_decode.md).

    /work/venv36/bin/python benchmarks/compile_flash.py --kind paged_decode --dim 128 --page-size 16 \
        --configs "16,64,4,3"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver, jit

from compile_gluon import ptxas_usage  # also puts the package's kernel modules on the path without its __init__


class _NoGPU:
    """The part of Triton's active driver that ``JITFunction.run`` asks before compiling."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compiling_only():
    """Within: every Triton launch compiles for sm_90 instead of running (the stand-in driver); yields the list the
    launches append ``(kernel name, CompiledKernel)`` to."""
    compiled, run = [], jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    driver.set_active(_NoGPU())
    jit.JITFunction.run = compile_only
    try:
        yield compiled
    finally:
        jit.JITFunction.run = run


def compile_launches(kind: str, cfg, *, dim: int, heads_q: int, heads_kv: int, seqlen: int, causal: bool,
                     softcap: float = 0.0, dtype=torch.bfloat16):
    """``[(kernel name, CompiledKernel)]`` of one forward (``kind == "fwd"``) or backward call with ``cfg`` forced."""
    from hf_attn_plugin.kernels import configs, flash
    from hf_attn_plugin.kernels.params import AttentionParams

    real_candidates = configs.candidates
    configs.candidates = lambda k, block_d: (cfg,) if k == kind else real_candidates(k, block_d)[:1]
    flash._gluon_check = lambda *a, **k: (lambda: "compiling the Triton kernels")
    try:
        with compiling_only() as compiled:
            q = torch.randn(1, seqlen, heads_q, dim, dtype=dtype)
            k, v = (torch.randn(1, seqlen, heads_kv, dim, dtype=dtype) for _ in range(2))
            params = AttentionParams.create(dim, causal=causal, softcap=softcap)
            if kind == "fwd":
                flash.flash_attn_forward(q, k, v, params)
            else:
                flash.flash_attn_backward(torch.randn_like(q), q, k, v, torch.randn_like(q),
                                          torch.zeros(1, heads_q, seqlen), params)
    finally:
        configs.candidates = real_candidates
    return compiled


def compile_paged(cfg, *, dim: int, heads_q: int, heads_kv: int, seqlen: int, page_size: int = 0,
                  dtype=torch.bfloat16):
    """``[(kernel name, CompiledKernel)]`` of one paged decode launch (4 sequences x ``seqlen`` cached keys, one
    query each, 8 splits) with ``cfg`` forced. ``page_size`` 0: the decode route's contiguous cache (pages of one
    position the kernel computes, no block table); else a pool of ``page_size``-position pages read through a block
    table."""
    from hf_attn_plugin.kernels import paged
    from hf_attn_plugin.kernels.params import AttentionParams

    with compiling_only() as compiled:
        batch = 4
        q = torch.randn(batch, heads_q, dim, dtype=dtype)
        seq_lens = torch.full((batch,), seqlen, dtype=torch.int32)
        if page_size:
            pages = batch * -(-seqlen // page_size)
            pool = torch.randn(pages, page_size, heads_kv, dim, dtype=dtype)
            tables = torch.arange(pages, dtype=torch.int32).view(batch, -1)
            plan = paged.Plan(q.shape, dtype, q.device, pool.shape, tables, seq_lens, None, 1, None, 8, cfg)
        else:
            pool = torch.randn(batch, seqlen, heads_kv, dim, dtype=dtype)  # the cache itself: pages of one position
            plan = paged.Plan(q.shape, dtype, q.device, (batch * seqlen, 1, heads_kv, dim), None, seq_lens, None, 1,
                              None, 8, cfg, rows=seqlen, capacity=seqlen)
        paged.run(q, pool, pool, plan, AttentionParams.create(dim, causal=True))
    return compiled


def mma_instructions(ptx: str) -> dict:
    return dict(collections.Counter(re.findall(r"(?:wgmma\.mma_async|mma)\.sync\.aligned\.(\w+)", ptx)))


def parse_config(text: str):
    from hf_attn_plugin.kernels import configs

    fields = text.split(",")
    block_m, block_n, warps, stages = (int(x) for x in fields[:4])
    return configs.Config(block_m, block_n, warps, stages, warp_spec="ws" in fields[4:],
                          two_pass="tp" in fields[4:], min_split_keys=2 * block_n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="bwd_dkdv", choices=("fwd", "bwd_dq", "bwd_dkdv", "paged_decode"))
    ap.add_argument("--page-size", type=int, default=0,
                    help="paged_decode: pages of this many positions through a block table (0: the decode route's "
                         "contiguous cache, no table)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", default="32,8", help="query,key/value heads")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--softcap", type=float, default=0.0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--configs", required=True, help="space-separated BLOCK_M,BLOCK_N,warps,stages[,ws][,tp]")
    args = ap.parse_args()
    hq, hkv = (int(x) for x in args.heads.split(","))
    names = {"fwd": "_attn_fwd", "bwd_dq": "_attn_bwd_dq", "bwd_dkdv": "_attn_bwd_dkdv",
             "paged_decode": "_paged_attention_kernel"}
    print("| config | kernel launch | regs | spill st/ld (B) | smem (B) | MMA instructions |")
    print("|---|---|---|---|---|---|")
    for text in args.configs.split():
        cfg = parse_config(text)
        if args.kind == "paged_decode":
            launches = compile_paged(cfg, dim=args.dim, heads_q=hq, heads_kv=hkv, seqlen=args.seqlen,
                                     page_size=args.page_size, dtype=getattr(torch, args.dtype))
        else:
            launches = compile_launches(args.kind, cfg, dim=args.dim, heads_q=hq, heads_kv=hkv, seqlen=args.seqlen,
                                        causal=not args.non_causal, softcap=args.softcap,
                                        dtype=getattr(torch, args.dtype))
        for i, (name, kernel) in enumerate(l for l in launches if l[0] == names[args.kind]):
            use = ptxas_usage(kernel.asm["ptx"])
            print(f"| {text} | {name} #{i + 1} | {use['regs']} | {use['spills']} | {kernel.metadata.shared} | "
                  f"{mma_instructions(kernel.asm['ptx'])} |", flush=True)


if __name__ == "__main__":
    main()
