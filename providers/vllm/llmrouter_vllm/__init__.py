"""llmrouter provider that runs vLLM's engine inside the llmrouter process.

Importing this package does not import vLLM; the engine is built in
:meth:`VLLMProvider.start`.
"""

from llmrouter_vllm.provider import VLLMOptions, VLLMProvider

__all__ = ["VLLMOptions", "VLLMProvider"]
