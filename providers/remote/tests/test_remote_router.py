"""RemoteProvider behind the Router: config-built deployments, retries onto a healthy node,
request ids forwarded, cancellation reaching the upstream."""

import time

import anyio
import pytest

from llmrouter import RequestContext, Router
from llmrouter.config import parse_config
from llmrouter.testing.upstream import Behaviour, FakeUpstream

pytestmark = pytest.mark.anyio


def two_node_config(first: FakeUpstream, second: FakeUpstream) -> dict:
    return {
        "router": {"strategy": "priority", "retry": {"attempts": 2, "backoff_base": 0.001}},
        "models": [
            {
                "name": "chat",
                "deployments": [
                    {
                        "provider": "remote",
                        "model": "fake-model",
                        "id": "node-1",
                        "priority": 0,
                        "base_url": first.base_url,
                    },
                    {
                        "provider": "remote",
                        "model": "fake-model",
                        "id": "node-2",
                        "priority": 1,
                        "base_url": second.base_url,
                    },
                ],
            }
        ],
    }


async def test_router_fails_over_to_the_next_node_and_forwards_the_request_id() -> None:
    async with FakeUpstream(reply="from node one") as one, FakeUpstream(reply="from node two") as two:
        router = Router(parse_config(two_node_config(one, two), env={}))
        async with router:
            one.enqueue("unavailable")
            ctx = RequestContext(request_id="rid-42")
            response = await router.chat(
                {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}, context=ctx
            )
            assert response.choices[0].message.content == "from node two"
            assert ctx.deployment == "node-2" and ctx.usage is not None and not ctx.usage.estimated
            assert one.last_request.headers["x-request-id"] == "rid-42"
            assert two.last_request.headers["x-request-id"] == "rid-42"
            assert two.last_request.json["model"] == "fake-model"

            chunks = [
                c
                async for c in router.stream(
                    {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                )
            ]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "from node one"
            assert all(c.usage is None for c in chunks)  # the client did not ask for usage


async def test_a_node_refusing_the_deployments_key_counts_against_that_deployment() -> None:
    # The node's 403 model_not_allowed is about the deployment's key: counted as its
    # failure (toward its cooldown), not passed over as a refusal of this one request.
    refusal = Behaviour(status=403, error_code="model_not_allowed", error_message="this API key may not")
    async with FakeUpstream(reply="from node one") as one, FakeUpstream(reply="from node two") as two:
        router = Router(parse_config(two_node_config(one, two), env={}))
        async with router:
            one.enqueue(refusal)
            response = await router.chat({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
            assert response.choices[0].message.content == "from node two"
            failures = {d.id: d.failures for d in router.deployments}
            assert failures == {"node-1": 1, "node-2": 0}


async def test_router_stream_cancellation_reaches_the_upstream() -> None:
    async with FakeUpstream(chunks=200, delay_ms=20) as slow, FakeUpstream() as spare:
        router = Router(parse_config(two_node_config(slow, spare), env={}))
        async with router:
            with anyio.move_on_after(0.3):
                async for _ in router.stream(
                    {
                        "model": "chat",
                        "messages": [{"role": "user", "content": "go"}],
                        "stream": True,
                        "max_tokens": 1000,
                    }
                ):
                    pass
            left_at = time.monotonic()
            record = slow.last_request
            assert await record.wait_disconnected(2.0)
            assert record.disconnected_at is not None and record.disconnected_at - left_at < 0.25
