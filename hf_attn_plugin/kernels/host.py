"""Host-side helpers of kernel launches: integer arithmetic in plain Python, TMA-ready tensors, and re-launches of
kernels Triton has already compiled.

``triton.next_power_of_2`` and ``triton.cdiv`` are ``constexpr_function`` objects (Triton >= 3.4): usable inside
kernels, but a host call goes through a wrapper that unwraps every argument, ~3-13 us a call against ~0.2 us for
the arithmetic. A decode step calls the launch code once per layer, several times each: these are the same
functions without the wrapper (same results for every non-negative integer).

:class:`Relauncher`: ``kernel[grid](...)`` (``JITFunction.run``) binds every argument, computes its specialization
(pointer alignment, integer classes) in ~30 calls, builds a cache key and looks the kernel up before it launches:
~35 us of host time per launch on the H200's host, where a decode step's whole attention kernel runs in ~5 us
(NOTES_decode.md). The layers of a decode step launch one kernel with one set of constexprs and the same
integers; only the tensors change. A :class:`Relauncher` keeps the ``CompiledKernel`` the first launch returned
under a key of the runtime arguments (each tensor's dtype and 16-byte alignment, every other argument's value: a
finer key than Triton's own specialization) and launches it again directly (``compiled[grid](...)``: the same
launcher and hooks that ``JITFunction.run`` ends with).
"""

from __future__ import annotations

import torch
import triton

__all__ = ["Relauncher", "cdiv", "next_power_of_2", "relaunch_key", "relauncher", "tma_ready"]


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


def _relaunch_supported() -> bool:
    """Whether this Triton's ``CompiledKernel`` launches itself (``compiled[grid](*args, stream=...)``, the call
    ``JITFunction.run`` ends with, in Triton 3.6-3.x). Any other version keeps the plain path."""
    try:
        from triton.compiler import CompiledKernel
    except ImportError:
        return False
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (3, 6) <= (major, minor) < (4, 0) and hasattr(CompiledKernel, "__getitem__")


_RELAUNCH = None  # _relaunch_supported(), read on first use (importing triton.compiler early is not free)


def relaunch_key(args: tuple) -> tuple:
    """Each tensor's dtype and 16-byte alignment, every other argument as it is: equal keys, equal specializations
    (Triton specializes pointers by dtype and alignment, integers by value class, nothing else)."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args])


def _current_device() -> int:
    """The device Triton launches on (its driver's current device), as ``JITFunction.run`` reads it."""
    from triton.runtime import driver

    return driver.active.get_current_device()


def _current_stream(device: int) -> int:
    from triton.runtime import driver

    return driver.active.get_current_stream(device)


class Relauncher:
    """Launches of one Triton kernel with fixed constexprs and launch options (one per kernel, config and feature set).

    ``constexprs``: the kernel's constexpr parameters by name (any order), which must be exactly its last parameters;
    ``options``: ``num_warps``, ``num_stages``. :meth:`launch` takes the runtime arguments in signature order, the
    trailing ones optionally by keyword. Share instances through :func:`relauncher`: the compiled kernels live here.
    """

    __slots__ = ("kernel", "constexprs", "tail", "options", "compiled", "runtime_names")

    MAX_KEYS = 1024  # distinct runtime-argument keys kept (lengths and strides are part of the key)

    def __init__(self, kernel, constexprs: dict, **options):
        names = list(kernel.arg_names)
        first = len(names) - len(constexprs)
        if set(constexprs) != set(names[first:]):
            raise ValueError(f"constexprs {list(constexprs)} are not the last parameters of {names}")
        self.kernel, self.options = kernel, options
        self.constexprs = {name: constexprs[name] for name in names[first:]}  # signature order
        self.tail = tuple(self.constexprs.values())  # the launcher takes every parameter, constexprs included
        self.runtime_names = names[:first]
        self.compiled: dict = {}  # runtime-argument key -> CompiledKernel

    def launch(self, grid: tuple, args: tuple, **named):
        """``kernel[grid](*args, **named, **constexprs, **options)``, relaunched where it already ran with this key;
        returns the kernel Triton compiled (what ``kernel[grid](...)`` returns). As with Triton's own launches, the
        kernel runs on the current device's current stream (a kernel is loaded per device: the device is part of
        the key)."""
        if named:
            rest = self.runtime_names[len(args):]
            if set(named) != set(rest):
                raise TypeError(f"arguments {sorted(named)} given by name; the kernel's remaining ones are {rest}")
            args = (*args, *(named[name] for name in rest))
        # Entries exist only where relaunching works (a compiled GPU launch), so an empty table never asks the
        # driver for a device (the interpreter has none).
        device = _current_device() if self.compiled else None
        key = device, relaunch_key(args)
        kernel = self.compiled.get(key)
        if kernel is not None:  # Triton's launcher, hooks included; it reads three grid extents (the JIT pads them)
            kernel[(*grid, 1, 1)[:3]](*args, *self.tail, stream=_current_stream(device))
            return kernel
        kernel = self.kernel[grid](*args, **self.constexprs, **self.options)
        global _RELAUNCH
        if _RELAUNCH is None:
            _RELAUNCH = _relaunch_supported()
        if _RELAUNCH and type(kernel).__name__ == "CompiledKernel":  # not a future, not the interpreter's None
            if len(self.compiled) >= self.MAX_KEYS:
                self.compiled.clear()
            self.compiled[_current_device(), key[1]] = kernel
        return kernel


_RELAUNCHERS: dict = {}


def relauncher(kernel, constexprs: dict, **options) -> Relauncher:
    """The shared :class:`Relauncher` of ``kernel`` with these constexprs and options (one per combination, for the
    life of the process: every launch of a combination after the first per runtime-argument key is a relaunch)."""
    key = kernel, *constexprs.items(), *options.items()
    found = _RELAUNCHERS.get(key)
    if found is None:
        found = _RELAUNCHERS[key] = Relauncher(kernel, constexprs, **options)
    return found
