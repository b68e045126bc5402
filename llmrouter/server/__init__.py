"""The OpenAI-compatible HTTP service (Litestar): ``create_app()``.

Importing this package imports Litestar; ``import llmrouter`` does not.
"""

from llmrouter.server.app import create_app, create_app_from_env, default_extensions

__all__ = ["create_app", "create_app_from_env", "default_extensions"]
