"""Differences between the transformers releases we support (5.17 through the latest 5.x) live here."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)


def is_compiling() -> bool:
    """True while dynamo traces: no host synchronisation, no Python-side memoisation."""
    return torch.compiler.is_compiling()


def max_length_kwarg(kwargs: dict, which: str) -> int | None:
    """Maximum packed-sequence length, under the names transformers releases have used."""
    for name in (f"max_length_{which}", f"max_seqlen_{which}"):
        value = kwargs.get(name)
        if value is not None:
            return int(value)
    return None
