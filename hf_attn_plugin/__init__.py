"""hf_attn_plugin: Triton flash attention for Hugging Face Transformers.

``import hf_attn_plugin`` registers the attention implementation ``"plugin"``; then::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="plugin")
"""

from .integration import ATTN_IMPLEMENTATION, PagedCache, continuous_batching_context, generate_batch, register
from .ops import attention

__version__ = "0.1.0"
__all__ = [
    "ATTN_IMPLEMENTATION",
    "PagedCache",
    "attention",
    "continuous_batching_context",
    "generate_batch",
    "register",
    "__version__",
]

register()
