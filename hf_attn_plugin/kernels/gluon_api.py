"""The Gluon (``triton.experimental.gluon``) names the Hopper kernels use, imported once.

Gluon exists in Triton >= 3.5; the API used here is Triton 3.6's (the GPU image's). Without it, ``gluon`` is
``None`` and :data:`IMPORT_ERROR` says why: :mod:`gluon_fwd` and :mod:`gluon_bwd` then define no kernels and their
``unsupported_reason`` refuses every call, so the Triton kernels run.
"""

from __future__ import annotations

from typing import Optional

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
           "warpgroup_mma", "warpgroup_mma_wait"]
