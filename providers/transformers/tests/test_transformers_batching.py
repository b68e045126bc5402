"""Continuous batching: same answers alone or together, real cancellation, free worker."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from llmrouter_transformers import TransformersOptions, TransformersProvider
from llmrouter_transformers.engine import GenerationJob
from llmrouter_transformers.sampling import SamplingParams

from llmrouter.errors import InvalidRequestError
from llmrouter.testing.conformance import collect_stream
from llmrouter.types import ChatResponse, decode_chat_request, decode_completion_request

pytestmark = pytest.mark.anyio

PROMPTS = [
    "Hello there",
    "The capital of France is a long sentence with many words in it, much longer than the others",
    "日本語 😀 Café",
    "x",
    "Numbers: 1 2 3",
]


def greedy(prompt: str, max_tokens: int, **fields: Any) -> Any:
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    body.update({"temperature": 0, **fields})
    return decode_chat_request(body)


def answer(response: ChatResponse) -> tuple[str, str | None, int, int]:
    usage = response.usage
    assert usage is not None
    choice = response.choices[0]
    return (choice.message.content or "", choice.finish_reason, usage.prompt_tokens, usage.completion_tokens)


async def test_batched_output_equals_solo_output(tiny_provider: TransformersProvider) -> None:
    requests = [greedy(p, 12 + 5 * i) for i, p in enumerate(PROMPTS)]
    solo = [answer(await tiny_provider.chat(r)) for r in requests]
    steps_before = tiny_provider.engine.steps

    together: dict[int, tuple[str, str | None, int, int]] = {}

    async def run(index: int) -> None:
        together[index] = answer(await tiny_provider.chat(requests[index]))

    async with anyio.create_task_group() as tg:
        for index in range(len(requests)):
            tg.start_soon(run, index)

    assert [together[i] for i in range(len(requests))] == solo
    engine = tiny_provider.engine
    assert engine.peak_batch >= 2, "the concurrent requests were never decoded together"
    assert engine.steps - steps_before < sum(r.max_tokens for r in requests), "decoded one after another"


async def test_requests_joining_mid_generation_match_solo(tiny_provider: TransformersProvider) -> None:
    """Later requests join a running batch (cache merge with left padding) without changing anyone's answer."""
    requests = [greedy(p, 40) for p in PROMPTS]
    solo = [answer(await tiny_provider.chat(r)) for r in requests]
    results: dict[int, tuple[str, str | None, int, int]] = {}
    first_token = anyio.Event()

    async def run_first() -> None:
        chunks = []
        async for chunk in tiny_provider.stream(requests[0]):
            chunks.append(chunk)
            if any(c.delta.content for c in chunk.choices):
                first_token.set()
        text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        finish = next(c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason)
        usage = chunks[-1].usage
        assert usage is not None
        results[0] = (text, finish, usage.prompt_tokens, usage.completion_tokens)

    async def run(index: int) -> None:
        results[index] = answer(await tiny_provider.chat(requests[index]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_first)
        await first_token.wait()
        for index in range(1, len(requests)):
            tg.start_soon(run, index)
            await anyio.sleep(0.002)
    assert [results[i] for i in range(len(requests))] == solo
    assert tiny_provider.engine.peak_batch >= 2


def _job(engine: Any, prompt: str, max_new_tokens: int) -> GenerationJob:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    return GenerationJob(engine.tokenizer.encode(prompt), params, lambda _event: None)


def _record_passes(engine: Any, monkeypatch: pytest.MonkeyPatch, during_pass: Any) -> list[tuple[int, int]]:
    """(rows, tokens a row) of each forward pass; ``during_pass(passes)`` runs inside each."""
    passes: list[tuple[int, int]] = []
    forward = engine.model.forward

    def recording_forward(**inputs: Any) -> Any:
        passes.append(tuple(inputs["input_ids"].shape))
        during_pass(passes)
        return forward(**inputs)

    monkeypatch.setattr(engine.model, "forward", recording_forward)
    return passes


async def _until_done(*jobs: GenerationJob) -> None:
    for job in jobs:
        assert await anyio.to_thread.run_sync(job.done.wait, 30)


async def test_a_newcomer_is_prefilled_before_the_running_rows_decode_again(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that arrives during a step gets its first token from the next forward
    pass, not after a decoding step of the rows already running."""
    options = TransformersOptions(path=str(tiny_llama), device="cpu", torch_threads=1)
    async with TransformersProvider("tiny", options) as provider:
        engine = provider.engine
        first, late = _job(engine, "Hello there", 4), _job(engine, "Numbers: 1 2 3 4 5", 4)
        passes = _record_passes(engine, monkeypatch, lambda passes: len(passes) == 1 and engine.submit(late))
        engine.submit(first)
        await _until_done(first, late)
        assert passes[:3] == [(1, len(first.prompt_ids)), (1, len(late.prompt_ids)), (2, 1)], passes
        assert (len(first.generated), len(late.generated)) == (4, 4)


async def test_running_rows_decode_after_at_most_max_batch_size_prefills(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests arriving during every step (each done in its prefill) cannot starve the running rows."""
    options = TransformersOptions(path=str(tiny_llama), device="cpu", torch_threads=1, max_batch_size=2)
    async with TransformersProvider("tiny", options) as provider:
        engine = provider.engine
        running = _job(engine, "Hello there", 12)
        arrivals = [_job(engine, f"one token please {i}", 1) for i in range(8)]
        waiting = iter(arrivals)

        def one_arrives(_passes: object) -> None:
            for job in itertools.islice(waiting, 1):
                engine.submit(job)

        passes = _record_passes(engine, monkeypatch, one_arrives)
        engine.submit(running)
        await _until_done(running, *arrivals)
        assert min(len(job.prompt_ids) for job in [running, *arrivals]) > 1  # a pass of 1 token is a decode
        kinds = "".join("p" if length > 1 else "d" for _, length in passes)
        assert "ppp" not in kinds and kinds.count("p") == 9, kinds
        assert [len(job.generated) for job in arrivals] == [1] * 8


async def test_notify_comes_once_per_turn_after_the_turns_events(tiny_llama: Path) -> None:
    """Jobs sharing a ``notify`` (one event loop's relay) wake it once per turn, after their events."""
    options = TransformersOptions(path=str(tiny_llama), device="cpu", torch_threads=1)
    async with TransformersProvider("tiny", options) as provider:
        engine = provider.engine
        log: list[str] = []
        finished = threading.Event()

        def notify() -> None:
            log.append("notify")
            if all(job.done.is_set() for job in jobs):
                finished.set()  # the turn that finished the last job has ended

        jobs = [_job(engine, prompt, 6) for prompt in PROMPTS[:3]]
        for job in jobs:
            job.on_event, job.notify = lambda _event: log.append("event"), notify
        steps_before = engine.steps
        for job in jobs:
            engine.submit(job)
        # Not _until_done(): jobs are marked done within their last turn, before its notify.
        assert await anyio.to_thread.run_sync(finished.wait, 30)
        turns = "".join("n" if entry == "notify" else "e" for entry in log).split("n")
        assert turns[-1] == "", "events after the last notify"
        assert all(turns[:-1]), "a notify without events before it"
        assert log.count("notify") <= engine.steps - steps_before < log.count("event")


async def _cancelled_job(provider: TransformersProvider) -> GenerationJob:
    """The job the engine dropped as cancelled (waits for the engine to get there)."""
    with anyio.fail_after(10):
        while True:
            jobs = [job for job in provider.engine.finished if job.finish_reason == "cancelled"]
            if jobs and not provider.engine.active:
                return jobs[-1]
            await anyio.sleep(0.005)


async def test_closing_a_stream_stops_generation_within_one_step(tiny_provider: TransformersProvider) -> None:
    stream = tiny_provider.stream(greedy("Write a long story", 1500))
    received = 0
    async for chunk in stream:
        received += sum(1 for c in chunk.choices if c.delta.content)
        if received >= 5:
            break
    await stream.aclose()
    job = await _cancelled_job(tiny_provider)
    assert job.steps_at_cancel is not None
    assert job.forward_steps - job.steps_at_cancel <= 1, (job.steps_at_cancel, job.forward_steps)
    assert len(job.generated) < 1500
    # The worker is free again: a new request runs to completion.
    with anyio.fail_after(30):
        _, finish, _, completion = answer(await tiny_provider.chat(greedy("again", 4)))
    assert (finish, completion) == ("length", 4)


async def test_cancelling_chat_stops_generation_within_one_step(tiny_provider: TransformersProvider) -> None:
    with anyio.move_on_after(0.05) as scope:
        await tiny_provider.chat(greedy("Write a long story", 1500))
    assert scope.cancelled_caught, "the request finished before it could be cancelled"
    job = await _cancelled_job(tiny_provider)
    assert job.steps_at_cancel is not None and job.forward_steps - job.steps_at_cancel <= 1
    assert 0 < len(job.generated) < 1500


async def test_cancelling_one_request_leaves_the_others_untouched(
    tiny_provider: TransformersProvider,
) -> None:
    keep = greedy(PROMPTS[1], 60)
    expected = answer(await tiny_provider.chat(keep))
    results: list[tuple[str, str | None, int, int]] = []

    async def doomed() -> None:
        with anyio.move_on_after(0.02):
            await tiny_provider.chat(greedy(PROMPTS[0], 1500))

    async def kept() -> None:
        results.append(answer(await tiny_provider.chat(keep)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed)
        tg.start_soon(kept)
    assert results == [expected]


async def test_requests_beyond_max_batch_size_wait_their_turn(tiny_llama: Path) -> None:
    options = TransformersOptions(path=str(tiny_llama), device="cpu", max_batch_size=2)
    async with TransformersProvider("tiny", options) as provider:
        solo = [answer(await provider.chat(greedy(p, 10))) for p in PROMPTS]
        together: dict[int, Any] = {}

        async def run(index: int) -> None:
            together[index] = answer(await provider.chat(greedy(PROMPTS[index], 10)))

        async with anyio.create_task_group() as tg:
            for index in range(len(PROMPTS)):
                tg.start_soon(run, index)
        assert [together[i] for i in range(len(PROMPTS))] == solo
        assert provider.engine.peak_batch == 2


async def test_seeded_sampling_is_reproducible(tiny_provider: TransformersProvider) -> None:
    def sampled(seed: int) -> Any:
        return greedy("Tell me something", 24, temperature=1.3, top_p=0.95, seed=seed)

    first = answer(await tiny_provider.chat(sampled(7)))
    again = answer(await tiny_provider.chat(sampled(7)))
    assert first == again
    others = {answer(await tiny_provider.chat(sampled(seed)))[0] for seed in range(1, 6)}
    assert len(others) >= 2, "different seeds gave the same text every time: is sampling on?"
    # A seeded request draws from its own generator: company in the batch changes nothing.
    together: list[Any] = []

    async def run(request: Any) -> None:
        together.append((request.seed, answer(await tiny_provider.chat(request))))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, sampled(7))
        tg.start_soon(run, greedy(PROMPTS[1], 30))
        tg.start_soon(run, sampled(99))
    assert dict(together)[7] == first


async def test_eos_token_ends_with_stop(tiny_provider: TransformersProvider) -> None:
    eos = tiny_provider.tokenizer.eos_token_id
    response = await tiny_provider.chat(greedy("hi", 10, logit_bias={str(eos): 100}))
    assert answer(response)[1:] == ("stop", response.usage.prompt_tokens, 1)  # type: ignore[union-attr]
    assert response.choices[0].message.content == ""
    im_end = tiny_provider.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = await tiny_provider.chat(greedy("hi", 10, logit_bias={str(im_end): 100}))
    assert forced.choices[0].finish_reason == "stop", "<|im_end|> (generation_config eos) must stop"


async def test_logit_bias_forces_a_token(tiny_provider: TransformersProvider) -> None:
    tokenizer = tiny_provider.tokenizer
    # A token of whole characters: a lone byte at the very end would be dropped (see flush).
    token = tokenizer("Paris", add_special_tokens=False)["input_ids"][0]
    forced = await tiny_provider.chat(greedy("hi", 5, logit_bias={str(token): 100}))
    assert forced.choices[0].message.content == tokenizer.decode([token] * 5)


@pytest.mark.parametrize("token", ["-1", "1000000000"])
async def test_a_logit_bias_outside_the_vocabulary_is_a_400(
    tiny_provider: TransformersProvider, token: str
) -> None:
    # As OpenAI and vLLM answer; it was silently ignored.
    with pytest.raises(InvalidRequestError) as info:
        await tiny_provider.chat(greedy("hi", 2, logit_bias={token: 5}))
    assert (info.value.http_status, info.value.param) == (400, "logit_bias")
    assert f"token id {token} is not in this model's vocabulary" in info.value.message


async def test_stream_deltas_join_to_the_full_decode(tiny_provider: TransformersProvider) -> None:
    """Whatever bytes the model emits, the deltas concatenate to the full decode, less
    the broken character ``max_tokens`` may leave at the end."""
    request = greedy(PROMPTS[2], 64)
    chunks = await collect_stream(tiny_provider.stream(request))
    streamed = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    job = tiny_provider.engine.finished[-1]
    decoded = tiny_provider.tokenizer.decode(job.generated, skip_special_tokens=True)
    assert streamed == decoded.rstrip("\ufffd")


async def test_completion_takes_token_ids(tiny_provider: TransformersProvider) -> None:
    ids = tiny_provider.tokenizer("Hello there")["input_ids"]
    by_text = await tiny_provider.complete(
        decode_completion_request(
            {"model": "tiny", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
        )
    )
    by_ids = await tiny_provider.complete(
        decode_completion_request({"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0})
    )
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage == by_ids.usage
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("prompt", ["", [""], [[]], [-1], [10**9]])
async def test_a_prompt_the_model_cannot_take_is_a_400_that_spares_the_batch(
    tiny_provider: TransformersProvider, prompt: Any
) -> None:
    # An empty prompt, or a token id outside the vocabulary, failed the engine's forward
    # pass: a 502, and the same error for every request batched beside it.
    keep = greedy(PROMPTS[1], 40)
    text, finish, _, completion = answer(await tiny_provider.chat(keep))
    stream = tiny_provider.stream(keep)
    first = [await stream.__anext__(), await stream.__anext__()]  # generating now
    bad = decode_completion_request({"model": "tiny", "prompt": prompt, "max_tokens": 2})
    with pytest.raises(InvalidRequestError) as info:
        await tiny_provider.complete(bad)
    assert (info.value.http_status, info.value.param) == (400, "prompt")
    assert ("no tokens" if prompt in ("", [""], [[]]) else "not in this model's vocabulary") in str(
        info.value
    )
    chunks = first + await collect_stream(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion


async def test_aclose_stops_the_engine_thread(tiny_llama: Path) -> None:
    provider = TransformersProvider("tiny", TransformersOptions(path=str(tiny_llama), device="cpu"))
    async with provider:
        engine = provider.engine
        assert engine.alive
        # A request still queued when the provider closes fails instead of hanging.
        await provider.chat(greedy("hi", 2))
    assert not engine.alive
    assert not [
        t for t in threading.enumerate() if t.name == "llmrouter-transformers-engine" and t.is_alive()
    ]
    await provider.aclose()  # twice is fine
