"""llmrouter-remote: route to any OpenAI-compatible server (vLLM, llama.cpp, TGI, another llmrouter)."""

from llmrouter_remote.provider import RemoteOptions, RemoteProvider

__all__ = ["RemoteOptions", "RemoteProvider"]
