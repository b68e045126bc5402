"""OpenAICompatClient sends through its own transport, or through an injected client."""

import httpx
import pytest

from llmrouter.openai_compat import OpenAICompatClient
from llmrouter.types import ChatMessage, ChatRequest

pytestmark = pytest.mark.anyio

ANSWER = (
    b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


def request() -> ChatRequest:
    return ChatRequest(model="m", messages=[ChatMessage(role="user", content="x")])


async def test_an_injected_client_is_used_with_its_hooks():
    seen = []

    async def hook(req: httpx.Request) -> None:
        seen.append((req.method, str(req.url), req.headers["authorization"]))

    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=ANSWER)),
        event_hooks={"request": [hook]},
    )
    upstream = OpenAICompatClient("http://upstream.test/v1", api_key="sk-1", http_client=client)
    response = await upstream.chat(request())
    assert response.choices[0].message.content == "hi"
    assert seen == [("POST", "http://upstream.test/v1/chat/completions", "Bearer sk-1")]
    await upstream.aclose()
    assert not client.is_closed, "an injected client belongs to its owner"
    await client.aclose()


async def test_an_injected_transport_gets_the_request_directly():
    bodies = []

    def handler(req: httpx.Request) -> httpx.Response:
        bodies.append(req.content)
        return httpx.Response(200, content=ANSWER)

    upstream = OpenAICompatClient("http://upstream.test", transport=httpx.MockTransport(handler))
    await upstream.chat(request())
    assert b'"model":"m"' in bodies[0] and b'"stream":true' not in bodies[0]
    await upstream.aclose()
