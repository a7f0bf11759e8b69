"""Integer helpers for the host side of kernel launches, in plain Python.

``triton.next_power_of_2`` and ``triton.cdiv`` are ``constexpr_function`` objects (Triton >= 3.4): usable inside
kernels, but a host call goes through a wrapper that unwraps every argument, ~3-13 us a call against ~0.2 us for
the arithmetic. A decode step calls the launch code once per layer, several times each: these are the same
functions without the wrapper (same results for every non-negative integer).
"""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers."""
    return -(-a // b)
