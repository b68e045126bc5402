"""llmrouter: a pluggable, multi-provider LLM router.

``from llmrouter import Router`` gives the library; ``llmrouter serve`` the
OpenAI-compatible service. Importing this package loads no torch, vLLM,
transformers, Litestar or SQLAlchemy.
"""

from llmrouter.config import Config, Deployment, ModelGroup, Price, load_config, parse_config
from llmrouter.context import RequestContext
from llmrouter.errors import (
    AuthenticationError,
    BudgetExceededError,
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    LLMRouterError,
    ModelNotFoundError,
    NoDeploymentAvailableError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llmrouter.hooks import CacheLayer, RouterHooks
from llmrouter.provider import Capabilities, Health, Provider, ProviderOptions
from llmrouter.router import Router
from llmrouter.sync import SyncRouter
from llmrouter.types import (
    ChatChunk,
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "CacheLayer",
    "Capabilities",
    "ChatChunk",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "CompletionRequest",
    "CompletionResponse",
    "Config",
    "ConfigError",
    "ContextWindowExceededError",
    "Deployment",
    "Health",
    "InvalidRequestError",
    "LLMRouterError",
    "ModelGroup",
    "ModelNotFoundError",
    "NoDeploymentAvailableError",
    "Price",
    "Provider",
    "ProviderOptions",
    "RateLimitError",
    "RequestContext",
    "Router",
    "RouterHooks",
    "SyncRouter",
    "UpstreamError",
    "UpstreamTimeoutError",
    "Usage",
    "__version__",
    "load_config",
    "parse_config",
]
