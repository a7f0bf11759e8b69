"""Per-step host-time split of ``generate_batch``: transformers' scheduler/manager vs model forward vs our glue.

Runs ``hf_attn_plugin.generate_batch`` (impl ``plugin``) and transformers' own ``model.generate_batch`` (impl
``sdpa``) on a Llama of ``--layers`` layers and ``--requests`` prompts of ``--min-len``..``--max-len`` tokens
(uniform, as ``bench_generate_batch.py``), greedy, ``--new-tokens`` each, and times (``perf_counter``, in the
generation thread, by wrapping methods for the run) every step's parts:

    prepare   ContinuousBatchProcessor.prepare_next_batch   (transformers: scheduler + host-built inputs)
      .sched    scheduler.schedule_batch
      .inputs   ContinuousBatchingIOs.prepare_batch_tensors (per-request read/write index lists -> tensors)
    compute   ContinuousBatchProcessor._generation_step     (forward + sampling + wait for the device)
      .fwd      model.forward (host: Python + op dispatch + launches; on CPU also the math)
      .wait     inputs_and_outputs.retrieve_device_outputs (device sync; ~0 on CPU)
    update    ContinuousBatchProcessor.update_batch          (transformers: per-request bookkeeping)
    ours      our attention glue, all layers (plugin only; inside .fwd):
      .blocktab  block tables / seq lens from HF's indices (once per step, memoised)
      .write     write_kv wrapper  (incl. the custom op + its body)
      .attn      paged_attention wrapper (incl. the custom op + its body)
      .body_write / .body_attn  custom-op bodies: Triton launches on GPU / reference math on CPU
      .describe  describe_call
      glue      = ours - bodies  (what the plugin adds on the host per step, besides launching kernels)

Rows are per step (ms, mean over steps; ``steps`` = generation steps). ``other`` = wall/step - (prepare +
compute + update): the manager's loop, queues, thread hand-offs; ``setup_s`` (cache creation, once) is
excluded from the per-step numbers. The tiny default model (hidden 64, head_dim 16)
makes device work negligible so a GPU run measures host time; ``--preset 1b`` runs bench_generate_batch's model.
``--cprofile N`` also writes the N top cumulative cProfile entries of the plugin run's generation thread
(``cprofile_<impl>.txt``; cProfile inflates Python-heavy parts, use it for ranking, not for the split).

CPU (reference backend):  HF_ATTN_PLUGIN_BACKEND=reference python benchmarks/host_overhead_generate_batch.py --out DIR
GPU (< 60 s):             python benchmarks/host_overhead_generate_batch.py --out DIR --device cuda

Writes ``DIR/host_overhead_generate_batch.csv`` (one row per impl and configuration).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import io
import os
import pstats
import statistics
import sys
import time

import torch
import transformers
from common import llama_1b, run_meta, write_rows

import hf_attn_plugin
from hf_attn_plugin import paged_ops
from hf_attn_plugin.integration import attention as attention_module
from hf_attn_plugin.integration import continuous_batching as cb_module


class Timers:
    """Inclusive per-label host time and call counts, by wrapping attributes for the duration of a run."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.defaultdict(int)
        self.info = {}
        self.steps = []  # (decode step?, cumulative seconds per label after the step)
        self._undo = []

    def wrap(self, owner, name: str, label: str) -> None:
        """Time ``owner.name`` (a class's plain method, a module's function or an object's bound method)."""
        had = name in vars(owner)
        raw = vars(owner).get(name)
        if isinstance(owner, type) and not callable(raw):
            raise TypeError(f"cannot time {owner.__name__}.{name}: not a plain method")
        target = raw if isinstance(owner, type) else getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        @functools.wraps(target)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, had, raw))

    def restore(self) -> None:
        for owner, name, had, raw in reversed(self._undo):
            if had:
                setattr(owner, name, raw)
            else:
                delattr(owner, name)
        self._undo.clear()


def make_model(preset: str, layers: int, device: str) -> transformers.PreTrainedModel:
    if preset == "1b":  # bench_generate_batch.py's model
        return llama_1b(layers, device=device).eval()
    # tiny: device work negligible, the step time is the host time
    return llama_1b(layers, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2).eval()


def instrument_ours(timers: Timers) -> None:
    from transformers import AttentionInterface

    mapping = AttentionInterface._global_mapping
    for key in (cb_module.PAGED_ATTN_IMPLEMENTATION, "plugin"):
        if key in mapping:
            original = mapping[key]

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    timers.seconds["ours"] += time.perf_counter() - start
                    timers.calls["ours"] += 1

            mapping[key] = timed
            timers._undo.append((_MappingSlot(mapping, key), "value", True, original))
    timers.wrap(cb_module.InPlacePagedUpdate, "__call__", "ours.update")  # 5.19+: the cache's update is ours
    timers.wrap(cb_module, "_memoised_step", "ours.blocktab")
    timers.wrap(paged_ops, "plan", "ours.blocktab")  # the step's paged-attention plan, built by its first layer
    for owner, names, label in ((cb_module, ("write_kv_trusted", "write_kv"), "ours.write"),
                                (paged_ops, ("run",), "ours.attn"),
                                (cb_module, ("describe_paged_call", "describe_call"), "ours.describe"),
                                (attention_module, ("describe_paged_call", "describe_call"), "ours.describe")):
        name = next(n for n in names if n in vars(owner))  # this tree's name (older trees: the public wrappers)
        timers.wrap(owner, name, label)
    timers.wrap(paged_ops, "paged_attention_reference", "ours.body_attn")
    timers.wrap(paged_ops, "_write_kv_reference", "ours.body_write")
    try:
        from hf_attn_plugin.kernels import paged as paged_kernels

        timers.wrap(paged_kernels, "paged_attention", "ours.body_attn")
        timers.wrap(paged_kernels, "run", "ours.body_attn")
        timers.wrap(paged_kernels, "write_kv", "ours.body_write")
    except ImportError:  # no Triton
        pass


class _MappingSlot:
    """Lets Timers.restore put a dict entry back (setattr(slot, "value", v) -> mapping[key] = v)."""

    def __init__(self, mapping, key):
        object.__setattr__(self, "_m", mapping)
        object.__setattr__(self, "_k", key)

    def __setattr__(self, name, value):
        self._m[self._k] = value


def profile_generation_thread(profiler: cProfile.Profile, timers: Timers) -> None:
    from transformers.generation.continuous_batching import continuous_api

    manager = continuous_api.ContinuousBatchingManager
    original = vars(manager)["_run_generation_loop"]

    def run(self, *args, **kwargs):
        profiler.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            profiler.disable()

    manager._run_generation_loop = run
    timers._undo.append((manager, "_run_generation_loop", True, original))


def cb_config(args) -> transformers.ContinuousBatchingConfig | None:
    fields = {}
    if args.cuda_graph is not None:
        fields["use_cuda_graph"] = args.cuda_graph == "on"
    if args.async_batching is not None:
        fields["use_async_batching"] = args.async_batching == "on"
    if args.max_batch_tokens:
        fields["max_batch_tokens"] = args.max_batch_tokens
    if args.block_size:
        fields["block_size"] = args.block_size
    return transformers.ContinuousBatchingConfig(**fields) if fields else None


def run_once(model, impl: str, prompts, new_tokens: int, config, timers: Timers | None, profiler=None):
    generation_config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                                      pad_token_id=0)
    model.set_attn_implementation(impl)
    if timers is not None:
        _instrument_all(timers, model, impl)
        if profiler is not None:
            profile_generation_thread(profiler, timers)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        kwargs = dict(generation_config=generation_config, continuous_batching_config=config)
        if impl == "plugin":
            outputs = hf_attn_plugin.generate_batch(model, prompts, engine="transformers", **kwargs)
        else:
            outputs = model.generate_batch(prompts, **kwargs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        if timers is not None:
            timers.restore()
    errors = [o.error for o in outputs.values() if o.error is not None]
    if errors or len(outputs) != len(prompts):
        raise RuntimeError(f"{impl}: {len(outputs)}/{len(prompts)} outputs, errors: {errors[:2]}")
    return wall, sum(len(o.generated_tokens) for o in outputs.values())


def _instrument_all(timers: Timers, model, impl: str) -> None:
    from transformers.generation.continuous_batching import continuous_api, input_outputs, scheduler

    processor = continuous_api.ContinuousBatchProcessor
    timers.wrap(processor, "prepare_next_batch", "prepare")
    timers.wrap(processor, "_generation_step", "compute")
    timers.wrap(processor, "update_batch", "update")
    step = vars(processor)["_generation_step"]

    def snapshot_after_step(self, *args, **kwargs):  # per-step deltas: update(i-1) + prepare(i) + compute(i)
        try:
            return step(self, *args, **kwargs)
        finally:
            io_ = self.inputs_and_outputs
            decode = getattr(io_, "num_q_tokens", -1) == getattr(io_, "num_request_in_batch", -2)
            timers.steps.append((decode, dict(timers.seconds)))

    processor._generation_step = snapshot_after_step
    timers._undo.append((processor, "_generation_step", True, step))
    for cls in vars(scheduler).values():
        if isinstance(cls, type) and issubclass(cls, scheduler.Scheduler) and "schedule_batch" in vars(cls):
            timers.wrap(cls, "schedule_batch", "prepare.sched")
    for name in ("ContinuousBatchingIOs", "ContinuousBatchingAsyncIOs"):
        cls = getattr(input_outputs, name, None)
        if cls is not None and "prepare_batch_tensors" in vars(cls):
            timers.wrap(cls, "prepare_batch_tensors", "prepare.inputs")
        if cls is not None and "retrieve_device_outputs" in vars(cls):
            timers.wrap(cls, "retrieve_device_outputs", "compute.wait")
    timers.wrap(model, "forward", "compute.fwd")
    manager = continuous_api.ContinuousBatchingManager
    create = vars(manager)["_create_batch_processor"]

    def create_and_record(self):
        processor = create(self)
        cache, config = processor.cache, processor.cb_config
        timers.info.update(num_blocks=getattr(cache, "num_blocks", ""), block_size=getattr(cache, "block_size", ""),
                           max_batch_tokens=getattr(cache, "max_batch_tokens", ""),
                           resolved_cuda_graph=getattr(config, "use_cuda_graph", ""),
                           resolved_async=getattr(config, "use_async_batching", ""))
        return processor

    manager._create_batch_processor = create_and_record
    timers._undo.append((manager, "_create_batch_processor", True, create))
    timers.wrap(manager, "_create_batch_processor", "setup")
    if impl == "plugin":
        instrument_ours(timers)


def decode_medians(timers: Timers) -> dict:
    """Medians over decode-only steps (every request one token: the steady state) of the main parts, in ms."""
    deltas, previous = [], {}
    for decode, totals in timers.steps:
        if decode:
            deltas.append({k: v - previous.get(k, 0.0) for k, v in totals.items()})
        previous = totals
    if not deltas:
        return {}
    median = lambda f: round(1e3 * statistics.median(f(d) for d in deltas), 3)  # noqa: E731
    ours = lambda d: d.get("ours", 0.0) + d.get("ours.update", 0.0)  # noqa: E731
    bodies = lambda d: d.get("ours.body_write", 0.0) + d.get("ours.body_attn", 0.0)  # noqa: E731
    return dict(
        decode_steps=len(deltas),
        decode_step_ms=median(lambda d: d.get("prepare", 0) + d.get("compute", 0) + d.get("update", 0)),
        decode_prepare_ms=median(lambda d: d.get("prepare", 0.0)),
        decode_update_ms=median(lambda d: d.get("update", 0.0)),
        decode_fwd_ms=median(lambda d: d.get("compute.fwd", 0.0)),
        decode_wait_ms=median(lambda d: d.get("compute.wait", 0.0)),
        decode_ours_ms=median(ours),
        decode_glue_ms=median(lambda d: ours(d) - bodies(d)),
        decode_fwd_minus_ours_ms=median(lambda d: d.get("compute.fwd", 0.0) - ours(d)),
    )


LABELS = ("setup", "prepare", "prepare.sched", "prepare.inputs", "compute", "compute.fwd", "compute.wait", "update",
          "ours", "ours.update", "ours.blocktab", "ours.write", "ours.attn", "ours.body_write", "ours.body_attn",
          "ours.describe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for host_overhead_generate_batch.csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("tiny", "1b"), default="tiny",
                        help="tiny: hidden 64, 4/2 heads, head_dim 16 (host-bound); 1b: bench_generate_batch's model")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--impls", default="plugin,sdpa", help="comma list of plugin, sdpa")
    parser.add_argument("--cuda-graph", choices=("on", "off"), default=None,
                        help="ContinuousBatchingConfig.use_cuda_graph (default: transformers decides)")
    parser.add_argument("--async-batching", choices=("on", "off"), default=None,
                        help="ContinuousBatchingConfig.use_async_batching (default: transformers decides)")
    parser.add_argument("--max-batch-tokens", type=int, default=0, help="0: transformers' default")
    parser.add_argument("--block-size", type=int, default=0, help="0: transformers' default")
    parser.add_argument("--stub-bodies", action="store_true",
                        help="reference backend only: replace our custom ops' math with no-ops (zeros), so a CPU run "
                             "shows host overhead instead of the reference math (tokens are then meaningless)")
    parser.add_argument("--no-timers", action="store_true", help="plain wall time only (no wrapping overhead)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also write the N top cumulative cProfile entries per impl (separate run)")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    if args.stub_bodies:
        paged_ops.paged_attention_reference = lambda q, *rest: torch.zeros_like(q)
        paged_ops._write_kv_reference = lambda *tensors: None
    model = make_model(args.preset, args.layers, args.device)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len, (args.requests,), generator=generator).tolist()
    prompts = [torch.randint(1, 32000, (n,), generator=generator).tolist() for n in lengths]
    config = cb_config(args)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {args.device}, "
          f"backend {os.environ.get('HF_ATTN_PLUGIN_BACKEND', 'auto')}, {args.preset} x{args.layers} layers, "
          f"{args.requests} requests, {args.new_tokens} new tokens, cb config {config}", flush=True)

    rows = []
    for impl in args.impls.split(","):
        try:
            run_once(model, impl, [p[:64] for p in prompts[:4]], 2, config, None)  # warm-up / compile
            timers = None if args.no_timers else Timers()
            wall, generated = run_once(model, impl, prompts, args.new_tokens, config, timers)
        except Exception as error:  # one failing path must not hide the other's numbers
            print(f"{impl}: FAILED {type(error).__name__}: {str(error)[:400]}", flush=True)
            continue
        steps = timers.calls["compute"] if timers else 0
        row = dict(run_meta("date", "transformers", "torch", "device", device=args.device),
                   backend=os.environ.get("HF_ATTN_PLUGIN_BACKEND", "auto") + ("+stub" * args.stub_bodies), preset=args.preset, layers=args.layers,
                   impl=impl, requests=args.requests, new_tokens=args.new_tokens,
                   cuda_graph=args.cuda_graph or "default", async_batching=args.async_batching or "default",
                   wall_s=round(wall, 3), generated=generated, new_tokens_per_s=round(generated / wall, 1),
                   steps=steps)
        if timers:
            per_step = lambda label: 1e3 * timers.seconds[label] / max(steps, 1)  # noqa: E731
            row.update(timers.info)
            row["wall_ms_per_step"] = round(1e3 * (wall - timers.seconds["setup"]) / max(steps, 1), 3)
            for label in LABELS:
                if label.startswith("ours") and impl != "plugin":
                    continue
                if label == "setup":
                    row["setup_s"] = round(timers.seconds[label], 3)
                    continue
                row[label.replace(".", "_") + "_ms"] = round(per_step(label), 3)
            row["other_ms"] = round(row["wall_ms_per_step"] - per_step("prepare") - per_step("compute")
                                    - per_step("update"), 3)
            if impl == "plugin":
                ours = per_step("ours") + per_step("ours.update")
                row["ours_ms"] = round(ours, 3)
                row["glue_ms"] = round(ours - per_step("ours.body_write") - per_step("ours.body_attn"), 3)
                row["ours_calls_per_step"] = round((timers.calls["ours"] + timers.calls["ours.update"]) / steps, 1)
            row["fwd_minus_ours_ms"] = round(per_step("compute.fwd") - row.get("ours_ms", 0.0), 3)
            row.update(decode_medians(timers))
        rows.append(row)
        print(f"{impl:7s} {generated} tokens in {wall:.2f}s ({generated / wall:.0f} tok/s), {steps} steps", flush=True)
        if timers:
            print("         per step (ms): " + ", ".join(
                f"{k[:-3]}={v}" for k, v in row.items() if k.endswith("_ms") or k == "wall_ms_per_step"), flush=True)
        if args.cprofile:
            profiler, ptimers = cProfile.Profile(), Timers()
            profile_generation_thread(profiler, ptimers)
            try:
                run_once(model, impl, prompts, args.new_tokens, config, None)
            finally:
                ptimers.restore()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.cprofile)
            path = os.path.join(args.out, f"cprofile_{impl}.txt")
            with open(path, "w") as f:
                f.write(text.getvalue())
            print(f"wrote {path}", flush=True)

    if rows:
        path = os.path.join(args.out, "host_overhead_generate_batch.csv")
        write_rows(path, rows)
        print(f"wrote {path}", flush=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
