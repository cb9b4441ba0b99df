"""fastdllm: Fast-dLLM v2 block-diffusion decoding and adaptation for pretrained AR LLMs."""

from .engine.params import DecodeConfig
from .errors import FastDLLMError
from .llm import LLM, GenerationResult

__all__ = ["LLM", "DecodeConfig", "GenerationResult", "FastDLLMError"]
__version__ = "0.1.0"
