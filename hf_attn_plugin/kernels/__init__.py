"""Triton kernels (no transformers imports here).

* :mod:`.flash`: FlashAttention-2 forward and backward (GQA, window, segments, softcap, sinks).
* :mod:`.configs`: launch configurations of every kernel, from shipped per-GPU tables (tuning only on request).

Submodules are imported lazily by :mod:`hf_attn_plugin.ops` so that importing the package never
needs Triton on a CPU-only install.
"""

__all__ = ["flash", "configs"]
