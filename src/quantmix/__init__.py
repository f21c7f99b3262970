"""quantmix: the best mixed-precision GGUF quantization of an LLM at an exact size budget."""

__version__ = "0.1.0"
