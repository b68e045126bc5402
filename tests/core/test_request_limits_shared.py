"""The router's check of structs built in code and the decoding's constraints read the
same limits (``llmrouter.types.MOST_TOKENS`` / ``MOST_CHOICES``): a copy in the router
could drift from the types' ``Meta`` bounds."""

import msgspec
import pytest

from llmrouter import router as router_module
from llmrouter import types
from llmrouter.errors import InvalidRequestError
from llmrouter.types import MOST_CHOICES, MOST_TOKENS, ChatMessage, ChatRequest, CompletionRequest


def test_the_router_has_no_limits_of_its_own():
    assert not hasattr(router_module, "_MOST_TOKENS") and not hasattr(router_module, "_MOST_CHOICES")
    assert router_module.MOST_TOKENS is types.MOST_TOKENS
    assert router_module.MOST_CHOICES is types.MOST_CHOICES


def _chat(**fields):
    return ChatRequest(model="m", messages=[ChatMessage(role="user", content="hi")], **fields)


@pytest.mark.parametrize(
    "field, most", [("max_tokens", MOST_TOKENS), ("max_completion_tokens", MOST_TOKENS), ("n", MOST_CHOICES)]
)
def test_chat_limits_agree_with_decoding(field, most):
    at_limit = _chat(**{field: most})
    assert router_module._chat_request(at_limit) is at_limit  # the fast path takes it as it is
    assert getattr(types.decode_chat_request(msgspec.json.encode(at_limit)), field) == most
    with pytest.raises(InvalidRequestError) as info:
        router_module._chat_request(_chat(**{field: most + 1}))
    assert info.value.param == field


@pytest.mark.parametrize(
    "field, most", [("max_tokens", MOST_TOKENS), ("best_of", MOST_TOKENS), ("n", MOST_CHOICES)]
)
def test_completion_limits_agree_with_decoding(field, most):
    at_limit = CompletionRequest(model="m", prompt="hi", **{field: most})
    assert router_module._completion_request(at_limit) is at_limit
    with pytest.raises(InvalidRequestError) as info:
        router_module._completion_request(CompletionRequest(model="m", prompt="hi", **{field: most + 1}))
    assert info.value.param == field
