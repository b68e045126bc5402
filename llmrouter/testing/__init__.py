"""Test helpers shipped with llmrouter: a fake OpenAI-compatible upstream and the provider
conformance suite.

Import the submodules directly (``llmrouter.testing.upstream``, ``llmrouter.testing.conformance``):
this package imports nothing heavy, so that ``import llmrouter.testing`` stays cheap and does
not need pytest or uvicorn until they are used.
"""

from __future__ import annotations

__all__: list[str] = []
