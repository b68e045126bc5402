"""llmrouter-ollama: serve the models of an Ollama daemon through llmrouter.

Install with ``pip install 'llmrouter[ollama]'``; the provider registers itself under
the entry point ``ollama``. See docs/providers/ollama.md.
"""

from llmrouter_ollama._discovery import DEFAULT_HOST, DiscoveryResult, groups_for, probe, resolve_host
from llmrouter_ollama.provider import OllamaOptions, OllamaProvider

__all__ = [
    "DEFAULT_HOST",
    "DiscoveryResult",
    "OllamaOptions",
    "OllamaProvider",
    "groups_for",
    "probe",
    "resolve_host",
]
