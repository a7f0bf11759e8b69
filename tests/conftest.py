import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be chosen before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


def interpreter_available() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
