import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be chosen before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .helpers import kernels_run_on  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "reference")


@pytest.fixture
def triton_backend(monkeypatch):
    """The Triton kernels (the interpreter on CPU), with the decode route on."""
    monkeypatch.setenv("HF_ATTN_PLUGIN_BACKEND", "triton")
    monkeypatch.delenv("HF_ATTN_PLUGIN_DECODE", raising=False)


@pytest.fixture(scope="module")
def flash_cpu():
    """kernels/flash.py under the Triton interpreter, outputs poisoned with NaN (every element must be written)."""
    if not kernels_run_on("cpu"):
        if not torch.cuda.is_available():
            pytest.fail("Triton interpreter not active: set TRITON_INTERPRET=1 before triton is imported")
        pytest.skip("GPU machine: the interpreter tests run on CPU-only machines; the GPU tests cover the kernels")
    from hf_attn_plugin.kernels import flash

    old, flash.POISON = flash.POISON, True
    yield flash
    flash.POISON = old


@pytest.fixture(scope="module")
def flash_gpu():
    """kernels/flash.py compiled for the GPU, outputs poisoned with NaN."""
    if kernels_run_on("cpu"):
        pytest.skip("TRITON_INTERPRET=1: GPU tests need compiled kernels")
    from hf_attn_plugin.kernels import flash

    old, flash.POISON = flash.POISON, True
    yield flash
    flash.POISON = old
