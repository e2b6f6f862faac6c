"""herd: an inference server for Llama 4 mixture-of-experts, natively multimodal models."""

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

# Loaded on first use: `herd keys` and `herd usage` should not pay for importing torch.
_EXPORTS = {
    "LLM": "herd.llm",
    "RequestOutput": "herd.engine.outputs",
    "CompletionOutput": "herd.engine.outputs",
    "SamplingParams": "herd.engine.sampling",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
