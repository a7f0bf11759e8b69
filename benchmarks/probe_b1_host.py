"""Is "plugin" slow at B=1 by itself, or is the process slower after it ran? (NOTES_decode.md, session 7.)

Plain ``generate()`` (B=1, 512-token prompt + 48 new, the ~1B model of bench_generate.py) per token, one process, in
the order eager, plugin, eager, sdpa, plugin, eager; then plugin and eager with the garbage collector frozen; then the
process's threads with their CPU times and the load average. ~60 s on an H200:

    python benchmarks/probe_b1_host.py
"""

from __future__ import annotations

import gc
import os
import threading

import torch
from common import llama_1b, timed

import hf_attn_plugin  # noqa: F401  (registers "plugin")

ORDER = ("eager", "plugin", "eager", "sdpa", "plugin", "eager")


def main() -> None:
    model = llama_1b(16, intermediate_size=8192, max_position_embeddings=8192).eval()
    prompt = torch.randint(0, 32000, (1, 512), device="cuda")

    def generate(n: int):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def ms_per_token(impl: str) -> float:
        model.set_attn_implementation(impl)
        generate(4)
        whole = min(timed(lambda: generate(48))[0] for _ in range(2))
        first = min(timed(lambda: generate(1))[0] for _ in range(2))  # prefill + one step
        return (whole - first) / 47 * 1e3

    for i, impl in enumerate(ORDER):
        print(f"{i} {impl}: {ms_per_token(impl):.2f} ms/token", flush=True)
    gc.collect()
    gc.freeze()
    gc.disable()
    print(f"gc frozen: plugin {ms_per_token('plugin'):.2f}, eager {ms_per_token('eager'):.2f} ms/token", flush=True)
    print("python threads:", [t.name for t in threading.enumerate()])
    for tid in sorted(os.listdir("/proc/self/task")):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/self/task/{tid}/comm") as f:
            name = f.read().strip()
        print(f"task {tid} {name}: user {int(fields[11]) / 100:.1f} s, system {int(fields[12]) / 100:.1f} s")
    print("load average", os.getloadavg(), "cpus", os.cpu_count(), "affinity", len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
