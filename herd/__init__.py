"""herd: an inference server for Llama 4 mixture-of-experts, natively multimodal models."""

from herd.engine.engine import LLM, CompletionOutput, RequestOutput
from herd.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
