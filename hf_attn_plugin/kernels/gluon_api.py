"""The Gluon (``triton.experimental.gluon``) names the Hopper kernels use, imported once.

Gluon exists in Triton >= 3.5; the API used here is Triton 3.6's (the GPU image's). Without it, ``gluon`` is
``None`` and :data:`IMPORT_ERROR` says why: :mod:`gluon_fwd` and :mod:`gluon_bwd` then define no kernels and their
``unsupported_reason`` refuses every call, so the Triton kernels run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the installed Triton
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None
    IMPORT_ERROR = exc

LOG2E = 1.4426950408889634  # host-side float (kernels/primitives.py has the Triton constexpr)

__all__ = ["IMPORT_ERROR", "LOG2E", "TensorDescriptor", "fence_async_shared", "gl", "gluon", "mbarrier", "tma",
           "warpgroup_mma", "warpgroup_mma_wait", "descriptor", "is_hopper", "rows_descriptor"]


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype):
    """The NVMMA shared-memory layout TMA boxes of ``block`` land in (immutable, so shared by every call: computing
    it costs ~10 us of host time, and a Gluon backward builds eight descriptors per call)."""
    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


def descriptor(t: torch.Tensor, block: list[int], shape: Optional[list[int]] = None,
               strides: Optional[list[int]] = None) -> "TensorDescriptor":
    """A host-side TMA descriptor over ``t`` (its own shape and strides unless given) with boxes of ``block``."""
    return TensorDescriptor(t, list(t.shape) if shape is None else shape,
                            list(t.stride()) if strides is None else strides, block,
                            _shared_layout(tuple(block), t.dtype))


def rows_descriptor(t: torch.Tensor, rows: int) -> "TensorDescriptor":
    """A ``[B, S, H, D]`` tensor in boxes of ``rows`` rows of one (batch, head): how the Gluon kernels read and write
    q, k, v, out and the gradients (strided views included: no copies)."""
    return descriptor(t, [1, rows, 1, t.shape[-1]])


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def is_hopper(device: torch.device) -> tuple[bool, tuple[int, int]]:
    """``(capability == sm_90, capability)`` of a CUDA ``device`` (cached per device: asked at every call)."""
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return cap == (9, 0), cap
