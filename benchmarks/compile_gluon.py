"""Compile the Gluon forward (hf_attn_plugin/kernels/gluon_fwd.py) for sm_90 without a GPU and report resources.

Run with the Triton 3.6 venv (no GPU needed):  /work/venv36/bin/python benchmarks/compile_gluon.py [--dump DIR]
Prints per config: registers, spills, shared memory, whether the PTX has wgmma.mma_async / setmaxnreg.

``--bwd``: the same table for the Gluon dK/dV backward (hf_attn_plugin/kernels/gluon_bwd.py).

``--candidates``: instead, compile what the launch-config system can pick (kernels/configs.py): every forward
candidate with ``gluon`` >= 0 and every Gluon entry of the shipped tables (tuned/*.json), bf16 and fp16, causal or
not, checking that each config's recorded shape (tiles, stages, default-partition warps) is the launcher's.
"""

from __future__ import annotations

import argparse
import os
import re

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402


def _load_kernel_module():
    """hf_attn_plugin.kernels.gluon_fwd without running the package __init__ (it imports transformers, which the
    Triton 3.6 venv lacks): empty package modules stand in for hf_attn_plugin and hf_attn_plugin.kernels."""
    import importlib
    import sys
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, path in (("hf_attn_plugin", "hf_attn_plugin"), ("hf_attn_plugin.kernels", "hf_attn_plugin/kernels")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(root, path)]
            sys.modules[name] = package
    return importlib.import_module("hf_attn_plugin.kernels.gluon_fwd")


def check_candidates() -> int:
    """Compile every Gluon config the config system can pick; returns the number of failures."""
    import glob
    import json

    from hf_attn_plugin.kernels import configs

    picks = {}
    for dim in gluon_fwd.SUPPORTED_HEAD_DIMS:
        for cfg in configs._GPU[("fwd", dim)]:
            if cfg.gluon >= 0:
                picks.setdefault((dim, cfg), []).append("candidate")
    for path in sorted(glob.glob(str(configs._TABLE_DIR / "*.json"))):
        with open(path) as f:
            table = configs.Table.from_json(json.load(f), path)
        for key, cfg in table.entries.items():
            if cfg.gluon >= 0:
                picks.setdefault((key.dim, cfg), []).append(f"{os.path.basename(path)} {key.to_json()}")
    failures = 0
    for (dim, cfg), where in sorted(picks.items(), key=lambda kv: (kv[0][0], kv[0][1].gluon)):
        for dtype in ("bf16", "fp16"):
            for causal in (True, False):
                try:
                    shape, k = compile_one(dim, causal, dtype, warp_spec=cfg.gluon)
                    recorded = (cfg.block_m, cfg.block_n, cfg.num_stages, cfg.num_warps)
                    launched = (shape["BLOCK_M"], shape["BLOCK_N"], shape["NUM_STAGES"], shape["num_warps"])
                    assert recorded == launched, f"config records {recorded}, the launcher uses {launched}"
                    status = (f"ok ({len(k.asm['cubin'])} B cubin, smem {k.metadata.shared} B, "
                              f"{k.metadata.num_warps} warps in all)")
                except Exception as exc:  # report and go on
                    failures += 1
                    status = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                print(f"D={dim} {dtype} causal={causal} {cfg}: {status}  [{'; '.join(where)}]", flush=True)
    print(f"{len(picks)} Gluon configs x 4 (dtype, causal): {failures} failures")
    return failures


gluon_fwd = _load_kernel_module()


def _tile_descriptor(dtype: str, head_dim: int):
    """``desc(rows)``: the signature type of a ``[1, rows, 1, head_dim]`` TMA descriptor (as the launchers build)."""
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16

    def desc(rows):
        block = [1, rows, 1, head_dim]
        layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
        return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"

    return desc


def _constexprs(cfg: dict, causal: bool, warp_spec: int, head_dim: int) -> dict:
    return {"CAUSAL": causal, "WARP_SPEC": warp_spec, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
            "HEAD_DIM": head_dim, "NUM_STAGES": cfg["NUM_STAGES"]}


def compile_one(head_dim: int, causal: bool, dtype: str = "bf16", warp_spec: int = 0):
    cfg = dict(gluon_fwd._config(head_dim, warp_spec), WARP_SPEC=warp_spec)
    sub_m = cfg["BLOCK_M"] // (2 if warp_spec >= 2 else 1)
    desc = _tile_descriptor(dtype, head_dim)
    constexprs = _constexprs(cfg, causal, warp_spec, head_dim)
    signature = {
        "q_desc": desc(sub_m), "k_desc": desc(cfg["BLOCK_N"]), "v_desc": desc(cfg["BLOCK_N"]),
        "o_desc": desc(sub_m), "lse_ptr": "*fp32", "lse_stride_b": "i32", "lse_stride_h": "i32",
        "seqlen_q": "i32", "seqlen_k": "i32", "heads_q": "i32", "group": "i32", "qk_scale": "fp32",
        **{name: "constexpr" for name in constexprs},
    }
    src = GluonASTSource(gluon_fwd._attn_fwd_gluon, signature, constexprs)
    return cfg, triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})


def ptxas_usage(ptx: str) -> dict:
    """Registers / spill bytes / smem per ptxas -v on the PTX (CompiledKernel.n_regs needs a GPU driver)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "-arch=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill_st = re.search(r"(\d+) bytes spill stores", log)
    spill_ld = re.search(r"(\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)) if regs else None,
                spills=f"{spill_st.group(1) if spill_st else '?'}/{spill_ld.group(1) if spill_ld else '?'}", log=log)


def setmaxnreg(ptx: str) -> str:
    """The distinct setmaxnreg requests in the PTX, e.g. 'inc 240, dec 24' (empty: none)."""
    found = sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)), key=lambda t: int(t[1]))
    return ", ".join(f"{kind} {n}" for kind, n in found) or "-"


# ------------------------------------------------------------------ dK/dV backward (kernels/gluon_bwd.py)
def compile_bwd(head_dim: int, causal: bool, dtype: str = "bf16", warp_spec: int = 0):
    """Compile the Gluon dK/dV kernel for sm_90 (signature as ``gluon_bwd.gluon_attn_backward_dkdv`` launches it)."""
    import importlib

    gluon_bwd = importlib.import_module("hf_attn_plugin.kernels.gluon_bwd")
    cfg = gluon_bwd._config(head_dim, warp_spec)
    desc = _tile_descriptor(dtype, head_dim)
    constexprs = _constexprs(cfg, causal, warp_spec, head_dim)
    sub_n = cfg["BLOCK_N"] // (2 if warp_spec >= 2 else 1)
    stat_layout = gl.NVMMASharedLayout.get_default_for([1, cfg["BLOCK_M"]], gl.float32)  # lse / delta rows (2-D)
    stat_desc = f"tensordesc<fp32[1, {cfg['BLOCK_M']}],{stat_layout!r}>"
    signature = {
        "q_desc": desc(cfg["BLOCK_M"]), "k_desc": desc(sub_n), "v_desc": desc(sub_n),
        "do_desc": desc(cfg["BLOCK_M"]), "dk_desc": desc(sub_n), "dv_desc": desc(sub_n),
        "lse_desc": stat_desc, "delta_desc": stat_desc, "seqlen_q": "i32", "seqlen_k": "i32", "heads_kv": "i32",
        "group": "i32", "qk_scale": "fp32", "sm_scale": "fp32", **{name: "constexpr" for name in constexprs},
    }
    src = GluonASTSource(gluon_bwd._attn_bwd_dkdv_gluon, signature, constexprs)
    return cfg, triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})


def bwd_table(dump=None) -> int:
    """The dK/dV kernel's resource table (markdown) for every variant x D x causal, bf16 (plus fp16 at D64 and
    D128 non-causal); returns the number of failed compiles plus configs that spill."""
    print("| kernel | D | dtype | causal | warp_spec | BLOCK_MxN | stages | warps | regs | spill st/ld B | smem (B) "
          "| wgmma.mma_async | wgmma.wait | bar.sync | setmaxnreg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [(ws, d, c, "bf16") for ws in (0, 1, 2) for d in (64, 128) for c in (True, False)]
    cases += [(0, 64, False, "fp16"), (0, 128, False, "fp16")]
    failures = 0
    for warp_spec, head_dim, causal, dtype in cases:
        try:
            cfg, k = compile_bwd(head_dim, causal, dtype, warp_spec)
        except Exception as exc:  # report and go on
            failures += 1
            msg = str(exc).strip().splitlines()
            print(f"| dkdv | {head_dim} | {dtype} | {causal} | {warp_spec} | FAILED: {type(exc).__name__}: "
                  f"{' / '.join(msg[-3:])[:400]} |", flush=True)
            continue
        ptx = k.asm["ptx"]
        use = ptxas_usage(ptx)
        failures += use["spills"] != "0/0"
        print(f"| dkdv | {head_dim} | {dtype} | {causal} | {warp_spec} | {cfg['BLOCK_M']}x{cfg['BLOCK_N']} | "
              f"{cfg['NUM_STAGES']} | {cfg['num_warps']} | {use['regs']} | {use['spills']} | {k.metadata.shared} | "
              f"{len(re.findall(r'wgmma[.]mma_async', ptx))} | {len(re.findall(r'wgmma[.]wait_group', ptx))} | "
              f"{len(re.findall(r'bar[.]sync', ptx))} | {setmaxnreg(ptx)} |", flush=True)
        if dump:
            os.makedirs(dump, exist_ok=True)
            stem = f"dkdv_d{head_dim}_{dtype}_{'c' if causal else 'nc'}_ws{warp_spec}"
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(dump, f"{stem}.{ext}"), "w") as f:
                    f.write(k.asm[ext])
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", help="write ttgir/ptx per config into this folder")
    ap.add_argument("--candidates", action="store_true", help="compile the Gluon configs of kernels/configs.py "
                    "and the shipped tables instead")
    ap.add_argument("--bwd", action="store_true", help="the Gluon dK/dV backward (kernels/gluon_bwd.py) instead")
    args = ap.parse_args()
    if args.bwd:
        raise SystemExit(1 if bwd_table(args.dump) else 0)
    if args.candidates:
        raise SystemExit(1 if check_candidates() else 0)
    print("| D | causal | warp_spec | BLOCK_MxN | stages | warps | regs | spill st/ld B | smem (B) | wgmma.mma_async "
          "| wgmma.wait | setmaxnreg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [(ws, d, c) for ws in (0, 1, 2, 3) for d in (64, 128) for c in (True, False)]
    for warp_spec, head_dim, causal in configs:
        try:
            cfg, k = compile_one(head_dim, causal, warp_spec=warp_spec)
        except Exception as exc:  # report and go on: the other configs still tell something
            msg = str(exc).strip().splitlines()
            print(f"| {head_dim} | {causal} | {warp_spec} | FAILED: {type(exc).__name__}: "
                  f"{' / '.join(msg[-3:])[:400]} |")
            continue
        ptx = k.asm["ptx"]
        use = ptxas_usage(ptx)
        n_mma = len(re.findall(r"wgmma\.mma_async", ptx))
        n_wait = len(re.findall(r"wgmma\.wait_group", ptx))
        print(f"| {head_dim} | {causal} | {warp_spec} | {cfg['BLOCK_M']}x{cfg['BLOCK_N']} | {cfg['NUM_STAGES']} | "
              f"{cfg['num_warps']} | {use['regs']} | {use['spills']} | {k.metadata.shared} | {n_mma} | {n_wait} | "
              f"{setmaxnreg(ptx)} |")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = f"d{head_dim}_{'c' if causal else 'nc'}_ws{warp_spec}"
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(args.dump, f"{stem}.{ext}"), "w") as f:
                    f.write(k.asm[ext])


if __name__ == "__main__":
    main()
