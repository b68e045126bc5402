"""The event relay: events from the engine thread reach their streams, one loop wakeup per batch."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import anyio
import pytest
from llmrouter_transformers.engine import JobEvent
from llmrouter_transformers.relay import EventRelay

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _counting_wakeups(relay: EventRelay) -> list[int]:
    wakeups = [0]
    wake_loop = relay._wake_loop

    def counted(callback: Any) -> None:
        wakeups[0] += 1
        wake_loop(callback)

    relay._wake_loop = counted
    return wakeups


async def test_a_turns_events_reach_each_stream_in_order_with_one_wakeup() -> None:
    relay = EventRelay()
    wakeups = _counting_wakeups(relay)
    streams = [anyio.create_memory_object_stream[JobEvent](math.inf) for _ in range(3)]
    senders = [relay.sender(send) for send, _ in streams]

    def engine_turn() -> None:  # what the engine thread does in one turn: events, then notify
        for step in range(4):
            for index, on_event in enumerate(senders):
                on_event(JobEvent(text=f"{index}:{step}"))
        relay.wake()
        relay.wake()  # jobs sharing the relay: notify may come more than once

    thread = threading.Thread(target=engine_turn)
    thread.start()
    thread.join()
    for index, (_, receive) in enumerate(streams):
        with anyio.fail_after(5):
            texts = [(await receive.receive()).text for _ in range(4)]
        assert texts == [f"{index}:{step}" for step in range(4)]
    assert wakeups == [1]


async def test_wake_without_events_does_not_wake_the_loop() -> None:
    relay = EventRelay()
    wakeups = _counting_wakeups(relay)
    relay.wake()
    assert wakeups == [0]


async def test_events_for_a_consumer_that_left_are_dropped() -> None:
    relay = EventRelay()
    gone_send, gone_receive = anyio.create_memory_object_stream[JobEvent](math.inf)
    send, receive = anyio.create_memory_object_stream[JobEvent](math.inf)
    gone_receive.close()
    relay.sender(gone_send)(JobEvent(text="lost"))
    relay.sender(send)(JobEvent(text="kept"))
    relay.wake()
    with anyio.fail_after(5):
        assert (await receive.receive()).text == "kept"


def test_a_closed_loop_is_not_an_error() -> None:
    loop = asyncio.new_event_loop()

    async def make() -> EventRelay:
        return EventRelay()

    relay = loop.run_until_complete(make())
    loop.close()
    send, _receive = anyio.create_memory_object_stream[JobEvent](math.inf)
    relay.sender(send)(JobEvent(text="late"))
    relay.wake()  # the engine may finish a job after its loop has gone
