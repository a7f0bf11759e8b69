"""What several test files share: FA2's error rule, the one "can the kernels run here?" check, loading a script.

* :func:`assert_fa2_rule`: FA2's own tolerance (DESIGN.md §5) for a kernel's output against the float64 reference.
* :func:`kernels_run_on` / :data:`KERNELS_RUN` / :data:`needs_kernels`: whether the Triton kernels can run on a
  device's tensors in this process (compiled on a CUDA GPU; on CPU tensors only under the Triton interpreter,
  ``TRITON_INTERPRET=1``, which tests/conftest.py sets on machines without a GPU); :data:`needs_hopper` for the
  Gluon (sm_90) kernels.
* :func:`each_candidate`: every launch-config candidate forced in turn (the GPU sweeps of every kernel config).
* :func:`load_file`: a script of examples/ or benchmarks/ as a module, by its path (they are not installed
  packages; no ``sys.path`` edits).

GPU-only tests need only ``@pytest.mark.gpu``: tests/conftest.py skips them where there is no GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def max_abs_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref|, computed in float64."""
    return (got.double() - ref.double()).abs().max().item()


# Gradients take FlashAttention-3's absolute slack (hopper/test_flash_attn.py: 3e-5, and 3e-4 with a softcap) instead
# of FA2's 1e-5. Needed where PyTorch's error is exactly 0 by a structural cancellation: a row with a single visible
# key has P = 1, and PyTorch's softmax backward then gives dS = dP - dP = 0 exactly, while a flash kernel subtracts two
# float32 sums of D products taken in different orders (dP by the matrix unit, delta = rowsum(dO * O)): rounding per row
# that dK sums over the rows. Seen: Sq 614, Sk 1, D 128 (dK 1.6e-5, fp16, interpreter); Sq 591, Sk 1, D 256, softcap
# (dK 2.4e-5, bf16, H200).
GRAD_ATOL = 3e-5
SOFTCAP_GRAD_ATOL = 3e-4
# That rounding is per row, and dK sums it over every query row that sees the key (Sq x the GQA group): a random walk,
# so the slack grows with the square root of the rows summed past GRAD_ROWS. Seen: Sq 1229, Sk 1, group 3, D 256,
# bf16 on the H200: dK 3.27e-5 over 3687 rows (the GPU fuzz, session 11), where PyTorch's error is again exactly 0.
GRAD_ROWS = 1024


def grad_atol(rows_summed: int, softcap: bool = False) -> float:
    """The absolute slack of a gradient whose entries sum ``rows_summed`` per-row terms (dK/dV: Sq x group; dQ:
    Sk): :data:`GRAD_ATOL` (:data:`SOFTCAP_GRAD_ATOL` with a softcap) up to :data:`GRAD_ROWS` rows, growing as
    ``sqrt(rows_summed / GRAD_ROWS)`` beyond."""
    base = SOFTCAP_GRAD_ATOL if softcap else GRAD_ATOL
    return base * max(1.0, rows_summed / GRAD_ROWS) ** 0.5


def assert_fa2_rule(got: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, name: str = "out",
                    atol: float = 1e-5) -> None:
    """FA2's error rule: ``max|got - ref| <= 2 * max|low - ref| + atol`` (``atol`` 1e-5: FA2's; gradients take
    :func:`grad_atol`).

    ``ref``: the reference in float64 (or float32); ``low``: PyTorch computing the same function at the kernel's
    dtype (its own rounding error is the yardstick); ``got``: the kernel's result.
    """
    err, base = max_abs_error(got, ref), max_abs_error(low, ref)
    assert err <= 2 * base + atol, (
        f"{name}: err {err:.3e} > 2 * {base:.3e} + {atol:.0e} (FA2's rule: the kernel's error against the float64 "
        f"reference may be at most twice PyTorch's own error at the kernel's dtype)")


def kernels_run_on(device: str | torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process: CUDA tensors need a GPU, CPU
    tensors the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    # What hf_attn_plugin.kernels.configs.interpreting() reads; read here, since tests monkeypatch that function.
    return os.environ.get("TRITON_INTERPRET") == "1"


KERNELS_RUN = kernels_run_on(DEVICE)  # on the tests' device: the GPU where there is one, else the CPU
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN, reason="the Triton kernels cannot run here: needs a CUDA GPU, or TRITON_INTERPRET=1 set before "
    "triton is imported (tests/conftest.py sets it on machines without a GPU)")


HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)  # the Gluon kernels' GPU
needs_hopper = pytest.mark.skipif(not HAS_HOPPER, reason="needs an sm_90 GPU (H100/H200: run `pytest -m gpu` there)")


KERNEL_KINDS = ("fwd", "bwd_dq", "bwd_dkdv")


def each_candidate(monkeypatch, block_ds):
    """Force every launch-config candidate in turn: for ``i`` over the longest candidate list of the head-dim
    buckets ``block_ds``, ``configs.candidates`` offers each kernel kind only its ``i``-th config (its last one
    past the end of its list). Yields ``(i, forced)``; ``forced(kind, block_d)`` is the patched function (it names
    the configs in a failure message)."""
    from hf_attn_plugin.kernels import configs

    real = configs.candidates
    longest = max(len(real(kind, bd)) for kind in KERNEL_KINDS for bd in block_ds)
    for i in range(longest):
        def forced(kind, block_d, i=i):
            options = real(kind, block_d)
            return (options[min(i, len(options) - 1)],)

        monkeypatch.setattr(configs, "candidates", forced)
        yield i, forced


def pick_gluon_without_gluon(monkeypatch, kind: str, config) -> list:
    """Block importing the Gluon modules (any import raises ImportError) and make ``configs.pick`` answer ``config``
    (a Gluon config) for ``kind`` unless asked for a Triton-only config. Returns the list of ``(kind, triton_only)``
    the picks were asked for, in order: how the fallback tests see that the Triton config was asked next."""
    from hf_attn_plugin import kernels
    from hf_attn_plugin.kernels import configs

    for module in ("gluon_fwd", "gluon_bwd"):
        monkeypatch.delattr(kernels, module, raising=False)
        monkeypatch.setitem(sys.modules, f"hf_attn_plugin.kernels.{module}", None)
    asked = []
    real = configs.pick

    def pick(kind_, block_d, key, launch=None, *, triton_only=False):
        asked.append((kind_, triton_only))
        if kind_ == kind and not triton_only:
            return config
        return real(kind_, block_d, key, launch, triton_only=triton_only)

    monkeypatch.setattr(configs, "pick", pick)
    return asked


def load_file(path: str | Path, name: str | None = None) -> ModuleType:
    """The Python file ``path`` (absolute, or relative to the repository root) imported as module ``name`` (default:
    the file's stem) and registered in ``sys.modules``: how tests use examples/*.py and benchmarks/*.py, which are
    scripts, not installed packages."""
    path = Path(path) if Path(path).is_absolute() else ROOT / path
    name = name or path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def spy_launches(monkeypatch, module, name: str, record) -> None:
    """Replace the kernel ``module.<name>`` by a stand-in that calls ``record(args, kwargs)`` for every launch, then
    launches the real kernel (``kernel[grid](*args, **kwargs)``) as before."""
    kernel = getattr(module, name)

    class Spy:
        def __getattr__(self, attr):  # arg_names and the like: the kernel's
            return getattr(kernel, attr)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                record(args, kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Spy())
