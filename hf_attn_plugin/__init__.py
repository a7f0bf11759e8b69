"""hf_attn_plugin: Triton flash attention for Hugging Face Transformers.

``import hf_attn_plugin`` registers the attention implementation ``"plugin"``; then::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="plugin")
"""

from .integration import ATTN_IMPLEMENTATION, register
from .ops import attention

__version__ = "0.1.0"
__all__ = ["ATTN_IMPLEMENTATION", "attention", "register", "__version__"]

register()
