"""GGML tensor formats: the type registry (sizes) and the numerics (quantize / dequantize / error)."""

from quantmix.formats.api import (
    QuantError,
    UnsupportedTypeError,
    dequantize,
    quant_error,
    quantize,
    register_numerics,
    supported_types,
)
from quantmix.formats.registry import GGMLType, UnknownTypeError, all_types, get_type

__all__ = [
    "GGMLType", "QuantError", "UnknownTypeError", "UnsupportedTypeError", "all_types", "dequantize",
    "get_type", "quant_error", "quantize", "register_numerics", "supported_types",
]
