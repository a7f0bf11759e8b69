"""Command-line entry points that must start instantly.

``import hf_attn_plugin`` loads torch and transformers (seconds) because importing it registers the
``"plugin"`` attention implementation. The command-line tools therefore parse and check their arguments here,
outside that package, and import it only once the arguments are valid: ``--help`` and usage errors answer
in well under a second.
"""
