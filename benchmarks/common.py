"""What the benchmark scripts share: run metadata, timing, CSV tables, plotting, the model they measure.

The scripts run as ``python benchmarks/<script>.py`` (Python puts benchmarks/ on ``sys.path``, so ``import common``
works) and import ``hf_attn_plugin`` as installed (``pip install -e .``); examples/ scripts are loaded by path
(:func:`load_example`). Tables go to ``--out`` (``benchmarks/results/`` holds the CSVs and plots the README's tables
come from, see report.py); logs of runs go beside them, to ``benchmarks/logs/``.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOGS = ROOT / "benchmarks" / "logs"
DAY = "%Y-%m-%d"


# --------------------------------------------------------------------------------------------- run metadata
def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or ``"cpu"`` (a CPU device, or no CUDA)."""
    if (device is not None and torch.device(device).type != "cuda") or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def utc_now(fmt: str = DAY) -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime(fmt)


def _version(module: str) -> str:
    return __import__(module).__version__


_META = {
    "gpu": device_name,
    "device": device_name,  # the same value, under the column name some tables use
    "torch": lambda device: torch.__version__,
    "triton": lambda device: _version("triton"),
    "transformers": lambda device: _version("transformers"),
    "safetensors": lambda device: _version("safetensors"),
}


def run_meta(*fields: str, date_format: str = DAY, device: torch.device | str | None = None) -> dict:
    """The metadata columns of a results row, in the order asked: ``gpu`` / ``device`` (the GPU's name or cpu),
    ``torch`` / ``triton`` / ``transformers`` / ``safetensors`` (versions), ``date`` (now, UTC, ``date_format``)."""
    unknown = [f for f in fields if f not in _META and f != "date"]
    if unknown:
        raise ValueError(f"run_meta: unknown field(s) {unknown}; known: {', '.join([*_META, 'date'])}")
    return {f: utc_now(date_format) if f == "date" else _META[f](device) for f in fields}


def describe_device() -> str:
    """One line for a run's log: the GPU, its clocks, temperature and power now (nvidia-smi, where it exists),
    and the versions that matter. Clocks explain run-to-run differences; they are not a CSV column."""
    parts = [device_name()]
    if torch.cuda.is_available():
        query = "clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw"
        try:
            index = torch.cuda.current_device()
            out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            sm, sm_max, mem, temp, power = [x.strip() for x in out.split(",")]
            parts.append(f"SM clock {sm} (max {sm_max}), memory clock {mem}, {temp} C, {power}")
        except (OSError, subprocess.SubprocessError, ValueError):
            parts.append("clocks unknown (no nvidia-smi)")
    versions = {}
    for module in ("torch", "triton", "transformers"):
        try:
            versions[module] = _version(module)
        except ImportError:
            continue
    parts.append(", ".join(f"{k} {v}" for k, v in versions.items()))
    return " | ".join(parts)


def print_device() -> None:
    print(describe_device(), flush=True)


# --------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if (device is None and torch.cuda.is_available()) or (device is not None and torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device | str | None = None) -> tuple[float, object]:
    """(wall seconds, result) of ``fn()``, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def bench_ms(fn: Callable, *, warmup: int = 25, rep: int = 100, cuda_graph: bool = False,
             statistic: str = "median") -> float:
    """Device milliseconds of ``fn()``: ``triton.testing.do_bench`` (``cuda_graph``: ``do_bench_cudagraph``, the
    calls replayed from a CUDA graph, as a serving loop replays decode steps), ``statistic`` over the repetitions."""
    from triton.testing import do_bench, do_bench_cudagraph

    if cuda_graph:
        return do_bench_cudagraph(fn, rep=rep, return_mode=statistic)
    return do_bench(fn, warmup=warmup, rep=rep, return_mode=statistic)


def event_ms(fn: Callable) -> float:
    """Milliseconds of one ``fn()`` between two CUDA events (waits for the device)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def copy_bandwidth(nbytes: int = 2**31, rep: int = 100) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (``do_bench`` median of one copy). Timed
    eagerly: inside a CUDA graph the copy becomes a memcpy node that may run on a copy engine, not the SMs."""
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep=rep)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------- CSV tables
def append_rows(path: str | Path, rows: Iterable[dict], fields: list[str] | None = None) -> None:
    """Append ``rows`` to the CSV at ``path`` (columns ``fields``, default: the rows' keys in first-seen order;
    missing values written empty), writing the header when the file is new. An existing file must have exactly
    that header: otherwise ValueError, so that a changed script never mixes its columns into an older table."""
    rows = list(rows)
    if not rows:
        return
    fields = list(fields or dict.fromkeys(k for row in rows for k in row))
    path = Path(path)
    fresh = not path.exists() or path.stat().st_size == 0
    if not fresh:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has the columns {header}, but this run writes {fields}: write to another "
                             "--out folder, or move the old file away")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if fresh:
            writer.writeheader()
        writer.writerows(rows)


def write_rows(path: str | Path, rows: Iterable[dict], fields: list[str] | None = None) -> None:
    """(Re)write the CSV at ``path`` with ``rows`` (columns ``fields``, default: the rows' keys in first-seen order;
    missing values written empty). Scripts call it after every row, so a run cut short keeps what it measured."""
    rows = list(rows)
    if not rows:
        return
    fields = list(fields or dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------- plots
def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None (with a message) without matplotlib
    (``pip install -e ".[bench]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e \".[bench]\"): no plot", flush=True)
        return None
    return plt


# --------------------------------------------------------------------------------------------- models, examples
def llama_1b(layers: int = 16, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, **config):
    """The ~1B Llama-style GQA model the model-level benchmarks measure (hidden 2048, 32 query / 8 KV heads,
    head_dim 64, vocab 32000, ``layers`` layers), random weights from seed 0. ``config``: LlamaConfig fields that
    differ (intermediate_size defaults to 5632, max_position_embeddings to 4096)."""
    import transformers

    fields = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    fields.update(config)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**fields), dtype=dtype).to(device)


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as the module ``name`` (the examples are scripts, not part of the installed package)."""
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / "examples" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: benchmarks run from a checkout of the repository")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module
