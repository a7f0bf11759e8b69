"""``convert-to-gqa`` command line: it lives in :mod:`hf_attn_plugin_cli.convert_to_gqa`, outside this package,
so that ``--help`` and argument errors do not wait for torch and transformers (imported by ``hf_attn_plugin``).
Re-exported here for ``python -m hf_attn_plugin.conversion`` and for installs whose console script still
points at this module."""

from hf_attn_plugin_cli.convert_to_gqa import build_parser, main

__all__ = ["build_parser", "main"]
