"""hf_attn_plugin: Triton flash attention for Hugging Face Transformers.

``import hf_attn_plugin`` registers the attention implementation ``"plugin"``; then::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="plugin")
"""

from .integration import (ATTN_IMPLEMENTATION, EngineConfig, PagedCache, continuous_batching_context, generate_batch,
                          register, release_engine)
from .ops import attention

__version__ = "0.1.0"
__all__ = [
    "ATTN_IMPLEMENTATION",
    "EngineConfig",
    "PagedCache",
    "attention",
    "continuous_batching_context",
    "generate_batch",
    "register",
    "release_engine",
    "__version__",
]

register()
