"""MHA -> GQA checkpoint conversion (``convert-to-gqa``): mean-pool K/V heads of a local checkpoint, streaming."""

from .api import ConversionReport, convert_to_gqa
from .errors import ConversionError
from .families import FAMILIES, supported_model_types

__all__ = ["FAMILIES", "ConversionError", "ConversionReport", "convert_to_gqa", "supported_model_types"]
