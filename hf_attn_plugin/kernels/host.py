"""Host-side helpers of kernel launches: integer arithmetic in plain Python, and TMA-ready tensors.

``triton.next_power_of_2`` and ``triton.cdiv`` are ``constexpr_function`` objects (Triton >= 3.4): usable inside
kernels, but a host call goes through a wrapper that unwraps every argument, ~3-13 us a call against ~0.2 us for
the arithmetic. A decode step calls the launch code once per layer, several times each: these are the same
functions without the wrapper (same results for every non-negative integer).
"""

from __future__ import annotations

import torch

__all__ = ["cdiv", "next_power_of_2", "tma_ready"]


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers."""
    return -(-a // b)


def tma_ready(x: torch.Tensor) -> torch.Tensor:
    """``x`` if TMA can address it (16-byte aligned start and row strides, unit last stride), else a copy that can."""
    size = x.element_size()
    aligned = x.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in x.stride()[:-1])
    # a fresh allocation (contiguous() would return a misaligned but contiguous view unchanged)
    return x if aligned and x.stride(-1) == 1 else x.clone(memory_format=torch.contiguous_format)
