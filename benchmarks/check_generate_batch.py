"""Logit-level correctness, step-time breakdown and KV waste of ``hf_attn_plugin.generate_batch``.

On the ~1B Llama-style model of ``bench_generate_batch.py`` (random bf16 weights, same prompt generator):

(a) ``logits``: greedy continuations from transformers' ``sdpa`` ``generate_batch``; then
    * teacher-forced full forwards of prompt + continuation under ``plugin`` (contiguous flash kernels),
      ``sdpa`` and ``eager``: next-token logits at every continuation position;
    * ``model.generate`` with our ``PagedCache`` (plugin: paged prefill + paged decode kernels) vs
      ``sdpa`` and ``eager`` generate (``DynamicCache``), ``output_logits=True``, one left-padded
      batch: per-step logits, compared while the greedy tokens agree (and at the first differing step);
    * ``hf_attn_plugin.generate_batch`` tokens vs sdpa's: first step where they diverge.
    Reported: max / mean |logit diff|, top-1 agreement; ``eager`` vs ``sdpa`` is bf16's noise floor.
(b) ``profile``: ``torch.profiler`` (CUDA activity) over one ``hf_attn_plugin.generate_batch`` run of the
    full workload; GPU kernel time split into paged attention (split-K merged in the same kernel), K/V write, matmuls,
    other kernels; wall time, GPU busy time (union of kernel intervals) and the idle fraction.
(c) ``waste``: allocated-but-unused KV slots for the same workload: our ``PagePool`` (page 16) holding
    every request's final length, and averaged over the decode steps; transformers' own cache as seen
    by our attention in every step of a run without CUDA graphs (its page size, and the same lengths at page 16).

Each part runs in its own try/except and writes its CSV as soon as it is done.

    python benchmarks/check_generate_batch.py --out DIR              # GPU
    python benchmarks/check_generate_batch.py --out DIR --tiny       # CPU smoke run (2 layers, hidden 256)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import transformers
from common import llama_1b, sync, write_rows
from packaging.version import Version

import hf_attn_plugin
from hf_attn_plugin.integration import continuous_batching
from hf_attn_plugin.paged import PagePool

CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
PAGE = 16

# Kernel name -> category of the step-time breakdown (first match wins; names from kernels/paged.py).
CATEGORIES = (
    ("paged attention", ("_paged_attention_kernel",)),
    ("K/V write", ("_write_kv_kernel",)),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas")),
)


@dataclass
class Workload:
    prompts: list[list[int]]
    new_tokens: int
    # transformers' continuous-batching config (None: its defaults, as bench_generate_batch uses)
    cb_config: transformers.ContinuousBatchingConfig | None = None


def workload(requests: int, new_tokens: int, vocab: int, min_len: int, max_len: int,
             cb_config: transformers.ContinuousBatchingConfig | None) -> Workload:
    """bench_generate_batch's prompts: lengths uniform in [min_len, max_len), random token ids."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len, (requests,), generator=generator).tolist()
    return Workload([torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths], new_tokens,
                    cb_config)


def tiny_model() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def greedy_config(new_tokens: int, **kwargs) -> transformers.GenerationConfig:
    return transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0,
                                         **kwargs)


def run_generate_batch(model, impl: str, work: Workload) -> dict:
    model.set_attn_implementation(impl)
    kwargs = dict(generation_config=greedy_config(work.new_tokens), continuous_batching_config=work.cb_config)
    if impl == "plugin":
        return hf_attn_plugin.generate_batch(model, work.prompts, engine="transformers", **kwargs)
    return model.generate_batch(work.prompts, **kwargs)


def generated_tokens(outputs: dict) -> list[list[int]]:
    return [list(o.generated_tokens) for o in outputs.values()]


def write_csv(path: str, rows: list[dict]) -> None:
    write_rows(path, rows)
    print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------- (a) logits
class Agreement:
    """Accumulates |a - b| and top-1 agreement over logit rows [N, V]."""

    def __init__(self):
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.values = 0
        self.rows = 0
        self.top1_same = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a.float() - b.float()).abs()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.sum_abs += diff.sum().item()
        self.values += diff.numel()
        self.rows += a.shape[0]
        self.top1_same += (a.argmax(-1) == b.argmax(-1)).sum().item()

    def row(self, **fields) -> dict:
        return dict(fields, positions=self.rows, max_abs_diff=float(f"{self.max_abs:.4g}"),
                    mean_abs_diff=float(f"{self.sum_abs / max(self.values, 1):.4g}"),
                    top1_agreement=round(self.top1_same / max(self.rows, 1), 5))


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First index where two token lists differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def divergence_summary(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    steps = [first_divergence(a, b) for a, b in zip(ours, theirs)]
    diverged = sorted(s for s in steps if s is not None)
    return dict(identical_requests=f"{len(steps) - len(diverged)}/{len(steps)}",
                first_divergence_min=diverged[0] if diverged else "",
                first_divergence_median=diverged[len(diverged) // 2] if diverged else "")


@torch.no_grad()
def teacher_forced_logits(model, impl: str, work: Workload, continuations: list[list[int]]) -> list[torch.Tensor]:
    """Per request, logits [T, V] predicting each continuation token, from one full forward (no cache)."""
    model.set_attn_implementation(impl)
    out = []
    for prompt, cont in zip(work.prompts, continuations):
        ids = torch.tensor([prompt + cont], device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[0]
        out.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(cont)].float().cpu())
    return out


@torch.no_grad()
def generate_logits(model, impl: str, work: Workload, paged: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``model.generate`` on one left-padded batch: (tokens per row, logits [T, V] per row)."""
    model.set_attn_implementation(impl)
    width = max(len(p) for p in work.prompts)
    ids = torch.zeros(len(work.prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(work.prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    kwargs = {}
    if paged:
        pages_per_row = -(-(width + work.new_tokens) // PAGE)
        kwargs[CACHE_KWARG] = hf_attn_plugin.PagedCache(model, max_batch_size=len(work.prompts),
                                                        num_pages=len(work.prompts) * pages_per_row, page_size=PAGE)
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         generation_config=greedy_config(work.new_tokens, output_logits=True,
                                                         return_dict_in_generate=True), **kwargs)
    tokens = out.sequences[:, width:].tolist()
    logits = torch.stack(out.logits, 1).float().cpu()  # [B, T, V]
    return tokens, list(logits)


def part_logits(model, work: Workload, out_dir: str) -> None:
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        write_csv(os.path.join(out_dir, "logits.csv"), rows)

    sdpa_tokens = generated_tokens(run_generate_batch(model, "sdpa", work))
    plugin_tokens = generated_tokens(run_generate_batch(model, "plugin", work))
    report(dict(check="generate_batch tokens", a="plugin (paged kernels)", b="sdpa",
                **divergence_summary(plugin_tokens, sdpa_tokens)))

    forced = {impl: teacher_forced_logits(model, impl, work, sdpa_tokens) for impl in ("sdpa", "plugin", "eager")}
    for a, b in (("plugin", "sdpa"), ("eager", "sdpa"), ("plugin", "eager")):
        agree = Agreement()
        for x, y in zip(forced[a], forced[b]):
            agree.add(x, y)
        report(agree.row(check="teacher-forced full forward", a=a, b=b))
    sdpa_self = Agreement()  # does sdpa's forward reproduce its own generate_batch tokens?
    for logits, cont in zip(forced["sdpa"], sdpa_tokens):
        sdpa_self.top1_same += (logits.argmax(-1) == torch.tensor(cont)).sum().item()
        sdpa_self.rows += len(cont)
    report(dict(check="sdpa forward argmax vs sdpa generate_batch tokens", a="sdpa", b="sdpa",
                positions=sdpa_self.rows, top1_agreement=round(sdpa_self.top1_same / max(sdpa_self.rows, 1), 5)))
    del forced

    generated = {name: generate_logits(model, impl, work, paged)
                 for name, impl, paged in (("sdpa", "sdpa", False), ("plugin-paged", "plugin", True),
                                           ("eager", "eager", False))}
    for a, b in (("plugin-paged", "sdpa"), ("eager", "sdpa")):
        (tok_a, log_a), (tok_b, log_b) = generated[a], generated[b]
        agree = Agreement()
        for ta, tb, la, lb in zip(tok_a, tok_b, log_a, log_b):
            div = first_divergence(ta, tb)
            steps = len(ta) if div is None else div + 1  # logits at the first differing step share the prefix
            agree.add(la[:steps], lb[:steps])
        report(agree.row(check="generate() per-step logits, up to the first differing token", a=a, b=b,
                         **divergence_summary(tok_a, tok_b)))


# --------------------------------------------------------------------------- (b) profile
def category(name: str) -> str:
    lowered = name.lower()
    for label, patterns in CATEGORIES:
        if any(p.lower() in lowered for p in patterns):
            return label
    return "other kernels"


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class StepRecorder:
    """Records each continuous-batching step's sequence lengths and page size, from our attention path
    (no host sync: device tensors are kept and read after the run). Steps replayed from a CUDA graph run
    no Python: record a run without graphs."""

    NAMES = ("_step_from_indices", "_step_from_block_table")

    def __init__(self):
        self.steps: list[tuple[int, torch.Tensor]] = []
        self._originals = {name: getattr(continuous_batching, name) for name in self.NAMES}

    def __enter__(self):
        def recording(original):
            def record(page_size, *args):
                step = original(page_size, *args)
                self.steps.append((page_size, step.seq_lens.clone()))
                return step
            return record

        for name, original in self._originals.items():
            setattr(continuous_batching, name, recording(original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(continuous_batching, name, original)


def part_profile(model, work: Workload, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    device = model.device
    run_generate_batch(model, "plugin", Workload([p[:64] for p in work.prompts[:4]], 4, work.cb_config))  # warm-up
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        outputs = run_generate_batch(model, "plugin", work)
        sync(device)
        wall_s = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_s = busy_time_us([(e.time_range.start, e.time_range.end) for e in kernels]) * 1e-6
    by_category: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        seconds = (e.time_range.end - e.time_range.start) * 1e-6
        by_category.setdefault(category(e.name), []).append(seconds)
        by_name.setdefault(e.name, []).append(seconds)
    kernel_s = sum(sum(v) for v in by_category.values())

    rows = [dict(part="total", category="wall (profiled run)", kernels="", seconds=round(wall_s, 4), share_of_wall=1.0,
                 note=f"{generated} new tokens, {generated / wall_s:.0f} tokens/s under the profiler")]
    rows.append(dict(part="total", category="GPU busy (union of kernels)", kernels=len(kernels),
                     seconds=round(busy_s, 4), share_of_wall=round(busy_s / wall_s, 4)))
    rows.append(dict(part="total", category="GPU idle (wall - busy)", kernels="", seconds=round(wall_s - busy_s, 4),
                     share_of_wall=round(1 - busy_s / wall_s, 4)))
    for label in [c for c, _ in CATEGORIES] + ["other kernels"]:
        times = by_category.get(label, [])
        rows.append(dict(part="kernels", category=label, kernels=len(times), seconds=round(sum(times), 4),
                         share_of_wall=round(sum(times) / wall_s, 4),
                         share_of_kernel_time=round(sum(times) / kernel_s, 4) if kernel_s else ""))
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    for name, times in top:
        rows.append(dict(part="top kernels", category=category(name), kernels=len(times), seconds=round(sum(times), 4),
                         share_of_wall=round(sum(times) / wall_s, 4), note=name[:120]))
    write_csv(os.path.join(out_dir, "generate_batch_profile.csv"), rows)
    if not kernels:
        print("  no device kernels recorded (CPU run): only the wall time is meaningful", flush=True)
    for r in rows:
        print(f"  {r['part']:<12} {r['category']:<30} {str(r['kernels']):>7} {r['seconds']:>9} s "
              f"{r['share_of_wall']:>7} of wall  {r.get('note', '')}", flush=True)


# --------------------------------------------------------------------------- (c) waste
def allocator_waste(lengths: list[int], page_size: int) -> float:
    """Waste of our PagePool holding sequences of these lengths (one tiny pool: bookkeeping only)."""
    pages = sum(-(-n // page_size) for n in lengths)
    cache = PagePool(1, 1, 1, num_pages=max(pages, 1), page_size=page_size, max_seqs=len(lengths),
                         max_pages_per_seq=max(-(-max(lengths) // page_size), 1), dtype=torch.float32)
    for n in lengths:
        cache.append_slots(cache.add_sequence(), n)
    cache.check_invariants()
    return cache.waste()


def waste_from_lengths(lengths: list[int], page_size: int) -> float:
    pages = sum(-(-n // page_size) for n in lengths)
    return 1 - sum(lengths) / (pages * page_size) if pages else 0.0


def part_waste(model, work: Workload, out_dir: str) -> None:
    recorder = StepRecorder()
    no_graphs = copy.deepcopy(work.cb_config) or transformers.ContinuousBatchingConfig()
    no_graphs.use_cuda_graph = False  # every step runs our Python, so every step is recorded
    with recorder:
        run_generate_batch(model, "plugin", Workload(work.prompts, work.new_tokens, no_graphs))
    prompt_lens = [len(p) for p in work.prompts]
    final = [n + work.new_tokens - 1 for n in prompt_lens]  # the last new token is never written
    per_step = [waste_from_lengths([n + t for n in prompt_lens], PAGE) for t in range(work.new_tokens)]
    rows = [
        dict(cache="ours (PagedKVCache)", page_size=PAGE, when="end of generation, all requests held",
             waste=round(allocator_waste(final, PAGE), 5)),
        dict(cache="ours (PagedKVCache)", page_size=PAGE, when="mean over decode steps (all requests held)",
             waste=round(sum(per_step) / len(per_step), 5)),
        dict(cache="ours (PagedKVCache)", page_size=PAGE, when="worst decode step", waste=round(max(per_step), 5)),
    ]
    if recorder.steps:
        hf_page = recorder.steps[0][0]
        lens = [seq_lens.tolist() for _, seq_lens in recorder.steps]
        for page in dict.fromkeys((hf_page, PAGE)):
            wastes = [waste_from_lengths(step, page) for step in lens if step]
            label = "transformers' cache (its page size)" if page == hf_page else "transformers' lengths at page 16"
            rows.append(dict(cache=label, page_size=page,
                             when=f"mean over {len(wastes)} steps, pages holding the step's sequences",
                             waste=round(sum(wastes) / len(wastes), 5)))
            rows.append(dict(cache=label, page_size=page, when="worst step", waste=round(max(wastes), 5)))
    else:
        rows.append(dict(cache="transformers' cache", when="no step recorded"))
    write_csv(os.path.join(out_dir, "kv_waste.csv"), rows)
    for r in rows:
        print(f"  {r['cache']:<38} page {r.get('page_size', ''):>4}  {r['when']:<60} waste {r.get('waste', '')}",
              flush=True)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: 2 layers, hidden 256 (head_dim 64), a few short requests")
    parser.add_argument("--parts", default="profile,waste,logits", help="run in this order")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128, help="profile/waste workload")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--logit-requests", type=int, default=32)
    parser.add_argument("--logit-new-tokens", type=int, default=64)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    parts = args.parts.split(",")
    unknown = set(parts) - {"logits", "profile", "waste"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")

    cb_config = None
    if args.tiny:  # transformers sizes its cache from free memory; on CPU that is the host's RAM: keep it small
        model, vocab, lengths = tiny_model(), 128, (8, 40)
        cb_config = transformers.ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=256)
        args.requests, args.new_tokens = min(args.requests, 6), min(args.new_tokens, 6)
        args.logit_requests, args.logit_new_tokens = min(args.logit_requests, 3), min(args.logit_new_tokens, 5)
    else:
        model, vocab, lengths = llama_1b(args.layers).eval(), 32000, (64, 1024)  # bench_generate_batch.py's model
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {model.device}, "
          f"backend env {os.environ.get('HF_ATTN_PLUGIN_BACKEND', 'auto')}", flush=True)
    full = workload(args.requests, args.new_tokens, vocab, *lengths, cb_config)
    small = Workload(copy.deepcopy(full.prompts[: args.logit_requests]), args.logit_new_tokens, cb_config)

    for part in parts:
        print(f"== {part}", flush=True)
        start = time.perf_counter()
        try:
            if part == "logits":
                part_logits(model, small, args.out)
            elif part == "profile":
                part_profile(model, full, args.out)
            else:
                part_waste(model, full, args.out)
        except Exception:  # one failing part must not hide the others' results
            traceback.print_exc()
            sys.stdout.flush()
        print(f"   ({part}: {time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
