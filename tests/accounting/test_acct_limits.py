"""Rate limits: RPM, TPM, concurrency; 429 with Retry-After and an OpenAI body; shared by
replicas through Redis."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from llmrouter.accounting import Accounting
from llmrouter.accounting.config import EndUserLimits, LimitsConfig, RedisConfig
from llmrouter.accounting.limits import (
    EffectiveLimits,
    KeyLimitError,
    MemoryLimiter,
    RedisLimiter,
    seconds_until_fits,
)
from llmrouter.accounting.retries import Retries
from llmrouter.errors import RateLimitError
from llmrouter.redis_pool import connect

from .conftest import REDIS_URL, _redis_client, chat_context, drained, finish, make_config, needs_redis

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self, now: float = 6_000.0) -> None:  # 6000 = the start of a minute
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    async with _redis_client() as client:
        yield RedisLimiter(client, prefix=client.test_prefix)


async def test_rpm_refuses_with_retry_after_and_openai_body(limiter: Any) -> None:
    limits = EffectiveLimits(rpm=5)
    for _ in range(5):
        await limiter.release(await limiter.acquire("k1", limits, 0), 0)
    with pytest.raises(RateLimitError) as info:
        await limiter.acquire("k1", limits, 0)
    error = info.value
    assert error.http_status == 429 and not error.retryable
    assert 1 <= error.retry_after <= 120
    assert error.headers()["Retry-After"].isdigit()
    assert error.headers()["x-ratelimit-limit-requests"] == "5"
    assert error.headers()["x-ratelimit-remaining-requests"] == "0"
    assert error.to_body()["error"]["type"] == "rate_limit_error"
    assert error.to_body()["error"]["code"] == "rate_limit_exceeded"
    await limiter.release(await limiter.acquire("k2", limits, 0), 0)  # another key is not affected


async def test_a_ticket_says_what_the_windows_have_left(limiter: Any) -> None:
    limits = EffectiveLimits(rpm=5, tpm=1000)
    first = await limiter.acquire("left", limits, 100)
    assert first.headers() == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
    }
    await limiter.release(first, 300)  # the answer took 200 tokens more than the prompt's
    second = await limiter.acquire("left", limits, 100)
    assert (second.requests_left, second.tokens_left) == (3, 600)
    only_rpm = await limiter.acquire("other", EffectiveLimits(rpm=2, concurrency=4), 50)
    assert only_rpm.headers() == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1"}
    assert (await limiter.acquire("none", EffectiveLimits(concurrency=4), 50)).headers() == {}


def test_seconds_until_fits() -> None:
    assert seconds_until_fits(10, 1, prev=0, curr=5, elapsed=30) == 0.0
    # 10 last minute, none now, 30 s in: 5 still count, so one more fits at once
    assert seconds_until_fits(10, 1, prev=10, curr=0, elapsed=30) == 0.0
    assert seconds_until_fits(10, 1, prev=10, curr=0, elapsed=0) == pytest.approx(6.0)
    # this minute is full: wait for the next one, then until enough of this one has slid out
    assert seconds_until_fits(10, 1, prev=0, curr=10, elapsed=20) == pytest.approx(40 + 6.0)


async def test_sliding_window_in_memory() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limits = EffectiveLimits(rpm=10)
    for _ in range(10):
        await limiter.acquire("k", limits, 0)
    with pytest.raises(RateLimitError) as info:
        await limiter.acquire("k", limits, 0)
    # the next minute starts in 60 s; then 6 s more until a tenth of this full one has slid out
    assert info.value.retry_after == pytest.approx(66.0)
    clock.now += 60  # a new minute: the previous one still weighs fully at its start
    with pytest.raises(RateLimitError):
        await limiter.acquire("k", limits, 0)
    clock.now += 30  # half the previous minute is left: 5 of its 10 still count
    for _ in range(5):
        await limiter.acquire("k", limits, 0)
    with pytest.raises(RateLimitError):
        await limiter.acquire("k", limits, 0)


async def test_tpm_charges_estimate_and_trues_up() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limits = EffectiveLimits(tpm=1000)
    ticket = await limiter.acquire("k", limits, 100)
    await limiter.release(ticket, 900)  # the answer was long: 900 tokens in all
    await limiter.release(await limiter.acquire("k", limits, 100), 100)
    with pytest.raises(RateLimitError, match="tokens per minute"):
        await limiter.acquire("k", limits, 1)
    # a refused TPM check did not eat an RPM slot
    both = EffectiveLimits(rpm=1, tpm=1000)
    with pytest.raises(RateLimitError, match="tokens per minute"):
        await limiter.acquire("j", both, 5000)
    await limiter.acquire("j", both, 10)


async def test_concurrency_limit(limiter: Any) -> None:
    limits = EffectiveLimits(concurrency=3)
    tickets = [await limiter.acquire("k", limits, 0) for _ in range(3)]
    with pytest.raises(RateLimitError, match="concurrent requests") as info:
        await limiter.acquire("k", limits, 0)
    assert info.value.retry_after >= 1
    await limiter.release(tickets.pop(), 0)
    tickets.append(await limiter.acquire("k", limits, 0))


async def test_redis_concurrency_slots_of_a_dead_replica_expire(redis_client: Any) -> None:
    limiter = RedisLimiter(redis_client, prefix=redis_client.test_prefix, lease_seconds=0.3)
    limits = EffectiveLimits(concurrency=1)
    await limiter.acquire("k", limits, 0)  # never released: its replica "died"
    with pytest.raises(RateLimitError):
        await limiter.acquire("k", limits, 0)
    await anyio.sleep(0.4)
    await limiter.acquire("k", limits, 0)


class RepliesLost:
    """A Redis client whose scripts run but, while ``lose`` is set, never reply to their
    caller: ``lose`` is called instead (it raises a timeout, or cancels the caller).
    ``zrem_fails``: freeing a slot fails too (Redis went away); ``freed``: the slots
    freeing was tried for."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.lose: Any = None
        self.zrem_fails = False
        self.freed: list[str] = []

    def register_script(self, source: str) -> Any:
        script = self._client.register_script(source)

        async def run(**kwargs: Any) -> Any:
            reply = await script(**kwargs)
            if self.lose is not None:
                self.lose()
                await anyio.sleep_forever()
            return reply

        return run

    async def zrem(self, key: str, slot: str) -> Any:
        self.freed.append(slot)
        if self.zrem_fails:
            raise ConnectionError("connection reset")
        return await self._client.zrem(key, slot)


def _time_out() -> None:
    raise TimeoutError("Timeout reading from 127.0.0.1:6379")


async def test_an_admission_whose_reply_is_lost_frees_its_slot(redis_client: Any) -> None:
    # Redis ran the script (the slot was taken) but the reply never came: the caller
    # could not free a slot it never got the id of, and with concurrency 1 the key was
    # refused for the whole lease (15 minutes).
    client = RepliesLost(redis_client)
    retries = Retries()
    limiter = RedisLimiter(client, prefix=redis_client.test_prefix, retries=retries)
    one = EffectiveLimits(concurrency=1)
    client.lose = _time_out
    with pytest.raises(TimeoutError):
        await limiter.acquire("k", one, 0)
    # Freed in the background: the request's 503 waited a second redis.timeout for it.
    assert client.freed == [] and len(retries.give_backs) == 1
    await drained(retries.give_backs)
    with anyio.CancelScope() as scope:  # the client left while the script was on the wire
        client.lose = scope.cancel
        await limiter.acquire("k", one, 0)
    assert scope.cancelled_caught
    await drained(retries.give_backs)
    client.lose = None
    await limiter.release(await limiter.acquire("k", one, 0), 0)  # the one slot is free
    assert len(client.freed) == 2 and len(retries) == 0
    await retries.aclose()


async def test_a_slot_redis_cannot_free_at_once_is_freed_once_it_can(
    redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Nor does it push the settlements out of their queue: each admission refused while
    # Redis failed queued one there, and past the limit they evicted real spend.
    client = RepliesLost(redis_client)
    retries = Retries(limit=1)
    retries.add("a settlement", _settled)
    limiter = RedisLimiter(client, prefix=redis_client.test_prefix, retries=retries)
    one = EffectiveLimits(concurrency=1)
    client.lose, client.zrem_fails = _time_out, True
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await limiter.acquire("k", one, 0)
    assert [what for what, _ in retries._waiting] == ["a settlement"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no line per request
    assert not await retries.give_backs.try_all()
    client.lose = None
    with pytest.raises(RateLimitError, match="concurrent requests"):
        await limiter.acquire("k", one, 0)  # taken until Redis frees it
    client.zrem_fails = False
    assert await retries.give_backs.try_all()
    await limiter.release(await limiter.acquire("k", one, 0), 0)
    await retries.aclose()


async def _settled() -> None:
    pass


async def test_an_admission_redis_refused_has_nothing_to_give_back() -> None:
    # The connection refused, the script never left: there is no slot to free. Each
    # admission refused while Redis was down queued a give-back all the same, and tried
    # it first (3.5 times as slow a refusal).
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = connect("redis://127.0.0.1:9/0", timeout=1.0)
    retries = Retries()
    limiter = RedisLimiter(client, prefix="llmr-test-refused:", retries=retries)
    with pytest.raises(RedisConnectionError, match="connecting to"):
        await limiter.acquire("k", EffectiveLimits(concurrency=1), 0)
    assert len(retries) == 0 and len(retries.give_backs) == 0
    await client.aclose()


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_an_admission_that_found_no_free_connection_has_nothing_to_give_back(_: int) -> None:
    # Redis stopped answering: commands waiting for their reply hold all of the pool's
    # connections, and most admissions fail waiting for one, having sent nothing. Each
    # queued a give-back all the same, and past the lane's limit they pushed out those
    # of admissions that had reached Redis (a slot then stayed taken for its lease).
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = connect(REDIS_URL, timeout=0.1, max_connections=1)
    retries = Retries()
    limiter = RedisLimiter(client, prefix="llmr-test-no-connection:", retries=retries)
    held = await client.connection_pool.get_connection()  # the pool's one connection
    try:
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await limiter.acquire("k", EffectiveLimits(concurrency=1), 0)
    finally:
        await client.connection_pool.release(held)
    assert len(retries.give_backs) == 0
    await client.aclose()


async def test_a_true_up_after_the_minute_goes_to_the_minute_it_was_charged_in() -> None:
    # A request charged 600 tokens at 6000 ends at 6061 having used 100. Its -500 went to
    # the new minute's count, where it erased another request's 300.
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limits = EffectiveLimits(tpm=1000)
    long_one = await limiter.acquire("k", limits, 600)
    clock.now += 61
    await limiter.acquire("k", limits, 300)
    await limiter.release(long_one, 100)
    # 100 in the previous minute (59/60 of it still counts) and 300 in this one.
    assert (await limiter.window_headers("k", limits))["x-ratelimit-remaining-tokens"] == str(
        math.floor(1000 - 100 * 59 / 60 - 300)
    )
    older = await limiter.acquire("k", limits, 50)
    clock.now += 120  # two minutes on: that window no longer counts, nothing to true up
    await limiter.release(older, 0)
    assert (await limiter.window_headers("k", limits))["x-ratelimit-remaining-tokens"] == "1000"


async def test_redis_trues_up_the_minute_it_charged(redis_client: Any) -> None:
    limiter = RedisLimiter(redis_client, prefix=redis_client.test_prefix)
    limits = EffectiveLimits(tpm=10_000)
    ticket = await limiter.acquire("k", limits, 600)
    windows = limiter._keys("k")[0]
    # As the next request in the next minute finds the hash: rolled, this minute at 300.
    await redis_client.hset(windows, mapping={"start": ticket.minute + 60, "tp": 600, "tc": 300})
    await limiter.release(ticket, 100)
    assert [float(v) for v in await redis_client.hmget(windows, "tp", "tc")] == [100.0, 300.0]
    await redis_client.hset(windows, mapping={"start": ticket.minute + 120})
    await limiter.release(ticket, 0)  # two minutes on: nothing to true up
    assert [float(v) for v in await redis_client.hmget(windows, "tp", "tc")] == [100.0, 300.0]


async def test_redis_windows_are_shared_by_replicas(redis_client: Any) -> None:
    one = RedisLimiter(redis_client, prefix=redis_client.test_prefix)
    two = RedisLimiter(redis_client, prefix=redis_client.test_prefix)
    limits = EffectiveLimits(rpm=20, tpm=10_000)
    admitted = 0

    async def hit(limiter: RedisLimiter) -> None:
        nonlocal admitted
        try:
            await limiter.acquire("shared", limits, 10)
            admitted += 1
        except RateLimitError:
            pass

    async with anyio.create_task_group() as tg:
        for i in range(60):
            tg.start_soon(hit, one if i % 2 else two)
    assert admitted == 20


async def test_hooks_apply_key_limits_over_defaults(acct: Accounting, tmp_path: Path) -> None:
    acct.hooks.limits = LimitsConfig(rpm=100, concurrency=1)
    key, _ = await acct.keys.create("burst", concurrency=2)
    first, second = chat_context(key), chat_context(key)
    await acct.hooks.before_request(first)
    await acct.hooks.before_request(second)
    with pytest.raises(RateLimitError):
        await acct.hooks.before_request(chat_context(key))
    await acct.hooks.after_request(finish(first))
    third = chat_context(key)
    await acct.hooks.before_request(third)
    await acct.hooks.after_request(finish(second))
    await acct.hooks.after_request(finish(third))
    # the unauthenticated local user gets the defaults (concurrency 1)
    anon = chat_context()
    await acct.hooks.before_request(anon)
    with pytest.raises(RateLimitError):
        await acct.hooks.before_request(chat_context())
    await acct.hooks.after_request(finish(anon))


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_redis)])
async def test_replicas_configured_with_a_redis_url_share_limits(
    sqlite_url: str, tmp_path: Path, redis_prefix: str, _: int
) -> None:
    redis = RedisConfig(url=REDIS_URL, prefix=redis_prefix)
    config = make_config(sqlite_url, tmp_path, redis=redis, limits=LimitsConfig(rpm=3))
    async with Accounting(config) as one, Accounting(config) as two:
        assert isinstance(one.limiter, RedisLimiter) and one.budgets is not None
        assert type(one.budgets.store).__name__ == "RedisBudgetStore"
        admitted = 0
        for i in range(8):
            acct = (one, two)[i % 2]
            ctx = chat_context()
            try:
                await acct.hooks.before_request(ctx)
            except RateLimitError:
                continue
            admitted += 1
            await acct.hooks.after_request(finish(ctx))
        assert admitted == 3


async def test_memory_windows_of_subjects_gone_quiet_are_dropped() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    limits = EffectiveLimits(rpm=5, tpm=1000)
    for i in range(1000):  # a thousand end users, once each
        await limiter.acquire(f"key|user-{i}", limits, 10)
    clock.now += 60
    ticket = await limiter.acquire("key|user-0", limits, 10)  # still counted: 2 of 5
    assert ticket.requests_left == 3
    clock.now += 61
    await limiter.acquire("key|new", limits, 10)
    assert len(limiter._windows) == 4  # user-0's windows (used a minute ago) and the new one's


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def redis_or_not(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, RedisConfig]]:
    """Accounting config: limits in this process, or in Redis by URL (keys cleaned up)."""
    if request.param == "memory":
        yield {}
        return
    async with _redis_client() as client:
        yield {"redis": RedisConfig(url=REDIS_URL, prefix=client.test_prefix)}


async def test_end_users_of_a_key_have_limits_of_their_own(
    sqlite_url: str, tmp_path: Path, redis_or_not: dict[str, RedisConfig]
) -> None:
    limits = LimitsConfig(rpm=100, end_user=EndUserLimits(rpm=2, concurrency=1))
    async with Accounting(make_config(sqlite_url, tmp_path, limits=limits, **redis_or_not)) as acct:
        key, _ = await acct.keys.create("saas")
        held = chat_context(key, user="user-a")
        await acct.hooks.before_request(held)
        with pytest.raises(RateLimitError, match=r"1 concurrent requests.*end user 'user-a'"):
            await acct.hooks.before_request(chat_context(key, user="user-a"))
        await acct.hooks.after_request(finish(held))
        done = chat_context(key, user="user-a")
        await acct.hooks.before_request(done)  # the slot is back: the second of its 2 a minute
        assert done.extra_headers["x-ratelimit-limit-requests"] == "100"  # the key's headers
        await acct.hooks.after_request(finish(done))
        with pytest.raises(RateLimitError, match=r"2 requests per minute.*end user 'user-a'") as info:
            await acct.hooks.before_request(chat_context(key, user="user-a"))
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        for ctx in (chat_context(key, user="user-b"), chat_context(key), chat_context(key)):
            await acct.hooks.before_request(ctx)  # another end user, and requests naming none
            await acct.hooks.after_request(finish(ctx))


def test_budget_backend_follows_the_deployment_shape() -> None:
    from llmrouter.config import parse_config

    many = parse_config({"server": {"workers": 4}}, env={})
    assert Accounting.from_config(many).config.budget_backend == "database"
    assert Accounting.from_config(parse_config({}, env={})).config.budget_backend == "auto"


async def test_an_end_user_refused_by_their_own_limit_leaves_the_keys_requests_alone(
    sqlite_url: str, tmp_path: Path, redis_or_not: dict[str, RedisConfig]
) -> None:
    # End-user limits protect the key's other customers from one of them: a customer
    # hammering past their own limit must not use up the key's requests per minute.
    limits = LimitsConfig(rpm=5, end_user=EndUserLimits(rpm=2))
    async with Accounting(make_config(sqlite_url, tmp_path, limits=limits, **redis_or_not)) as acct:
        key, _ = await acct.keys.create("saas")
        refused = 0
        for _ in range(10):
            ctx = chat_context(key, user="hammering")
            try:
                await acct.hooks.before_request(ctx)
            except RateLimitError as exc:
                assert "end user 'hammering'" in exc.message
                refused += 1
                continue
            await acct.hooks.after_request(finish(ctx))
        assert refused == 8
        for n in range(3):  # the key's other 3 requests of the minute
            ctx = chat_context(key, user=f"customer-{n}")
            await acct.hooks.before_request(ctx)
            assert ctx.extra_headers["x-ratelimit-limit-requests"] == "5"  # the key's headers
            await acct.hooks.after_request(finish(ctx))
        with pytest.raises(RateLimitError, match=r"5 requests per minute"):
            await acct.hooks.before_request(chat_context(key, user="a-third"))


async def test_a_request_over_the_tpm_limit_is_refused_as_never_fitting(limiter: Any) -> None:
    """No wait admits more tokens than the TPM limit itself: the refusal says so, with the
    numbers, and tells the client not to retry; it was told to come back every minute."""
    limits = EffectiveLimits(rpm=1, tpm=100)
    for _ in range(2):  # refused the same way each time; it takes no RPM slot either
        with pytest.raises(KeyLimitError) as info:
            await limiter.acquire("big", limits, 101)
        error = info.value
        assert error.never_fits and error.retry_after is None
        assert "request too large" in error.message and "limit 100, requested 101" in error.message
        assert error.headers() == {"x-ratelimit-limit-tokens": "100", "x-should-retry": "false"}
        assert error.http_status == 429 and not error.retryable
    await limiter.release(await limiter.acquire("big", limits, 100), 100)  # the limit itself fits
    assert seconds_until_fits(100, 101, prev=0, curr=0, elapsed=0) == math.inf


async def test_an_end_users_refusal_carries_the_keys_rate_limit_headers(
    sqlite_url: str, tmp_path: Path, redis_or_not: dict[str, RedisConfig]
) -> None:
    """As the docs say (and as on the key's other responses), not the end user's: those
    told the client that the whole key had no request left."""
    limits = LimitsConfig(rpm=100, tpm=10_000, end_user=EndUserLimits(rpm=1))
    async with Accounting(make_config(sqlite_url, tmp_path, limits=limits, **redis_or_not)) as acct:
        key, _ = await acct.keys.create("saas")
        ctx = chat_context(key, user="cust-1", prompt_tokens=10)
        await acct.hooks.before_request(ctx)
        await acct.hooks.after_request(finish(ctx, prompt=10, completion=20))
        with pytest.raises(KeyLimitError, match=r"1 requests per minute.*end user 'cust-1'") as info:
            await acct.hooks.before_request(chat_context(key, user="cust-1"))
        headers = info.value.headers()
        assert headers["x-ratelimit-limit-requests"] == "100"
        assert headers["x-ratelimit-remaining-requests"] == "99"  # the refused request took none
        assert headers["x-ratelimit-limit-tokens"] == "10000"
        # the first request's 30 tokens (fewer if a new minute began in between)
        assert 9970 <= int(headers["x-ratelimit-remaining-tokens"]) < 10_000
        assert int(headers["Retry-After"]) >= 1  # when the end user's window has room


async def test_an_end_users_refusal_has_no_rate_limit_headers_when_the_key_has_no_limits(
    acct: Accounting,
) -> None:
    acct.hooks.limits = LimitsConfig(end_user=EndUserLimits(rpm=1))
    key, _ = await acct.keys.create("open")
    ctx = chat_context(key, user="cust-1")
    await acct.hooks.before_request(ctx)
    await acct.hooks.after_request(finish(ctx))
    with pytest.raises(KeyLimitError) as info:
        await acct.hooks.before_request(chat_context(key, user="cust-1"))
    assert not [name for name in info.value.headers() if name.startswith("x-ratelimit")]
