"""Rate limits per key: requests per minute, tokens per minute, concurrent requests.

RPM and TPM use a sliding-window counter (the current minute's count plus the previous
minute's, weighted by how much of it still overlaps the last 60 s): memory per key is
constant and bursts at a minute boundary are smoothed. TPM charges the prompt estimate
at admission and is trued up with the real token count when the request ends.

Two backends, same semantics: :class:`MemoryLimiter` (one process; each check and
update runs with no ``await`` between them) and :class:`RedisLimiter` (one Lua script
per admission, using the Redis server's clock, so every replica shares the windows).
Concurrency slots in Redis are leases, so a replica that dies frees its slots; an
admission that fails or is cancelled while its script is on the wire frees the slot it
may have taken in the background (its reply was lost, not necessarily the script), its
requests and tokens counted in their minute all the same.

A refusal is :class:`~llmrouter.errors.RateLimitError` (429, ``retryable=False``, with
``retry_after``), except for a request of more tokens than the TPM limit itself: no wait
can admit it, so it is refused at once as too large, without ``retry_after``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from llmrouter.accounting.retries import Retries, may_have_reached
from llmrouter.context import new_id
from llmrouter.errors import RateLimitError

__all__ = [
    "EffectiveLimits",
    "KeyLimitError",
    "LimitTicket",
    "Limiter",
    "MemoryLimiter",
    "RedisLimiter",
    "refuse_if_never_fits",
    "seconds_until_fits",
]

WINDOW = 60.0


@dataclass(frozen=True)
class EffectiveLimits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.concurrency is None


@dataclass
class LimitTicket:
    subject: str
    limits: EffectiveLimits
    tokens: int
    slot: str
    requests_left: int | None = None
    """Requests the RPM window has left after this one (None: no RPM limit)."""
    tokens_left: int | None = None
    """Tokens the TPM window has left after this one's prompt (None: no TPM limit)."""
    minute: float = 0.0
    """The start of the minute whose window was charged: the true-up at release goes to
    that minute's count (the previous window's, once the minute has passed), not to the
    minute the request happens to end in."""

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits that apply."""
        return _limit_headers(self.limits, self.requests_left, self.tokens_left)


def _limit_headers(
    limits: EffectiveLimits, requests_left: int | None, tokens_left: int | None
) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of the RPM and TPM windows that apply, with what they
    have left."""
    headers: dict[str, str] = {}
    if limits.rpm is not None and requests_left is not None:
        headers.update(_window_headers("rpm", limits.rpm, requests_left))
    if limits.tpm is not None and tokens_left is not None:
        headers.update(_window_headers("tpm", limits.tpm, tokens_left))
    return headers


_HEADER_NAMES = {"rpm": "requests", "tpm": "tokens"}


def _window_headers(kind: str, limit: int, left: int) -> dict[str, str]:
    """``x-ratelimit-limit-*`` and ``x-ratelimit-remaining-*`` of an RPM or TPM window."""
    unit = _HEADER_NAMES[kind]
    return {f"x-ratelimit-limit-{unit}": str(limit), f"x-ratelimit-remaining-{unit}": str(left)}


def seconds_until_fits(limit: float, need: float, prev: float, curr: float, elapsed: float) -> float:
    """Seconds until ``prev * (1 - (elapsed + t) / 60) + curr + need <= limit``; infinite
    when ``need`` alone is over ``limit`` (an empty window cannot take it either)."""
    if need > limit:
        return math.inf
    if curr + need <= limit:
        if prev <= 0:
            return 0.0
        return max(0.0, WINDOW * (1 - (limit - curr - need) / prev) - elapsed)
    later = WINDOW * (1 - (limit - need) / curr) if curr > 0 else 0.0
    return (WINDOW - elapsed) + max(0.0, later)


class KeyLimitError(RateLimitError):
    """A key's RPM, TPM or concurrency limit refused the request. Its response carries
    the ``x-ratelimit-*`` headers of the limit that refused it, remaining 0, beside
    ``Retry-After``, as OpenAI's 429s do (an end user's refusal carries its key's
    headers instead, as they stand).

    ``never_fits``: the request is larger than the limit itself, so no wait admits it:
    no ``Retry-After`` then, and ``x-should-retry: false``, which the OpenAI SDKs obey
    (they would otherwise retry it, as they retry any 429)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        limit_headers: dict[str, str],
        never_fits: bool = False,
    ) -> None:
        super().__init__(message, retry_after=retry_after, retryable=False)
        self.limit_headers = limit_headers
        self.never_fits = never_fits

    def headers(self) -> dict[str, str]:
        headers = {**super().headers(), **self.limit_headers}
        if self.never_fits:
            headers["x-should-retry"] = "false"
        return headers


def _refusal(kind: str, limit: int, wait: float) -> KeyLimitError:
    names = {"rpm": "requests per minute", "tpm": "tokens per minute", "concurrency": "concurrent requests"}
    return KeyLimitError(
        f"rate limit reached: {limit} {names[kind]}; retry after {math.ceil(wait)} s",
        retry_after=max(1.0, wait),
        limit_headers=_window_headers(kind, limit, 0) if kind in _HEADER_NAMES else {},
    )


def refuse_if_never_fits(limits: EffectiveLimits, tokens: int) -> None:
    """Refuse a request of more tokens than the TPM limit at once, before any window is
    read or charged: even an empty minute cannot take it, so a ``Retry-After`` would send
    the client back every minute forever (as OpenAI's "Request too large" does, the
    message gives the limit and what was requested).

    Raises:
        KeyLimitError: ``never_fits``, with the limit's ``x-ratelimit-limit-tokens``.
    """
    if limits.tpm is None or tokens <= limits.tpm:
        return
    raise KeyLimitError(
        f"request too large for the key's limit on tokens per minute (TPM): limit {limits.tpm}, "
        f"requested {tokens}; it can never be admitted as it is: send fewer tokens",
        retry_after=None,
        limit_headers={"x-ratelimit-limit-tokens": str(limits.tpm)},
        never_fits=True,
    )


class Limiter(Protocol):
    async def acquire(self, subject: str, limits: EffectiveLimits, tokens: int) -> LimitTicket:
        """Admit one request of ~``tokens`` tokens or raise :class:`RateLimitError`."""
        ...

    async def release(self, ticket: LimitTicket, actual_tokens: int) -> None:
        """The request ended: free its slot, true up its tokens."""
        ...

    async def window_headers(self, subject: str, limits: EffectiveLimits) -> dict[str, str]:
        """The ``x-ratelimit-*`` headers of ``subject``'s RPM and TPM windows as they are
        now, charging nothing (an end user's refusal carries its key's)."""
        ...

    async def aclose(self) -> None: ...


def _minute(now: float) -> float:
    """The start of the window (minute) ``now`` falls in."""
    return math.floor(now / WINDOW) * WINDOW


class _Window:
    __slots__ = ("curr", "prev", "start")

    def __init__(self, start: float) -> None:
        self.start, self.prev, self.curr = start, 0.0, 0.0

    def roll(self, now: float) -> float:
        """Move to the minute containing ``now``; returns the seconds elapsed in it."""
        minute = _minute(now)
        if minute != self.start:
            self.prev = self.curr if minute - self.start == WINDOW else 0.0
            self.curr, self.start = 0.0, minute
        return now - minute

    def estimate(self, elapsed: float) -> float:
        return self.prev * (1 - elapsed / WINDOW) + self.curr


class MemoryLimiter:
    """Limits for one process. Windows unused for two minutes count nothing any more and
    are dropped once a minute (subjects include end users, which come and go)."""

    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._in_flight: dict[str, int] = {}
        self._swept = clock()

    def _window(self, subject: str, kind: str, now: float) -> tuple[_Window, float]:
        window = self._windows.get((subject, kind))
        if window is None:
            if now - self._swept > WINDOW:
                self._sweep(now)
            window = self._windows[(subject, kind)] = _Window(_minute(now))
        return window, window.roll(now)

    def _sweep(self, now: float) -> None:
        stale = now - 2 * WINDOW  # its current and previous minutes are both over
        self._windows = {name: w for name, w in self._windows.items() if w.start > stale}
        self._swept = now

    async def acquire(self, subject: str, limits: EffectiveLimits, tokens: int) -> LimitTicket:
        refuse_if_never_fits(limits, tokens)
        now = self._clock()
        checks = [("rpm", limits.rpm, 1.0), ("tpm", limits.tpm, float(tokens))]
        admitted = []
        # Check everything before charging anything: a TPM refusal must not eat an RPM slot.
        for kind, limit, need in checks:
            if limit is None:
                continue
            window, elapsed = self._window(subject, kind, now)
            if window.estimate(elapsed) + need > limit:
                raise _refusal(
                    kind, limit, seconds_until_fits(limit, need, window.prev, window.curr, elapsed)
                )
            admitted.append((kind, limit, window, need, elapsed))
        if limits.concurrency is not None and self._in_flight.get(subject, 0) >= limits.concurrency:
            raise _refusal("concurrency", limits.concurrency, 1.0)
        left: dict[str, int] = {}
        for kind, limit, window, need, elapsed in admitted:
            window.curr += need
            left[kind] = max(0, math.floor(limit - window.estimate(elapsed)))
        if limits.concurrency is not None:
            self._in_flight[subject] = self._in_flight.get(subject, 0) + 1
        return LimitTicket(
            subject,
            limits,
            tokens,
            slot="",
            requests_left=left.get("rpm"),
            tokens_left=left.get("tpm"),
            minute=_minute(now),
        )

    async def release(self, ticket: LimitTicket, actual_tokens: int) -> None:
        if ticket.limits.concurrency is not None:
            left = self._in_flight.get(ticket.subject, 1) - 1
            if left > 0:
                self._in_flight[ticket.subject] = left
            else:
                self._in_flight.pop(ticket.subject, None)
        if ticket.limits.tpm is not None and actual_tokens != ticket.tokens:
            window, _ = self._window(ticket.subject, "tpm", self._clock())
            delta = actual_tokens - ticket.tokens
            if window.start == ticket.minute:
                window.curr = max(0.0, window.curr + delta)
            elif window.start - ticket.minute == WINDOW:
                window.prev = max(0.0, window.prev + delta)
            # Older: that window no longer counts, and nothing is trued up.

    async def window_headers(self, subject: str, limits: EffectiveLimits) -> dict[str, str]:
        now = self._clock()
        left: dict[str, int] = {}
        for kind, limit in (("rpm", limits.rpm), ("tpm", limits.tpm)):
            if limit is None:
                continue
            window = self._windows.get((subject, kind))  # none yet: nothing used, none made
            used = window.estimate(window.roll(now)) if window is not None else 0.0
            left[kind] = max(0, math.floor(limit - used))
        return _limit_headers(limits, left.get("rpm"), left.get("tpm"))

    async def aclose(self) -> None:
        self._windows.clear()
        self._in_flight.clear()


# The start of both scripts: the Redis server's clock, the minute it is in, and the
# windows hash (KEYS[1]) with the minute its current window started.
_WINDOWS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local minute = math.floor(now / 60) * 60
local elapsed = now - minute
local h = KEYS[1]
local start = tonumber(redis.call('HGET', h, 'start') or '0')
"""

# KEYS[1] = windows hash, KEYS[2] = concurrency leases (zset)
# ARGV = rpm, tpm, concurrency (-1 = none), tokens, slot id, lease seconds
_ACQUIRE = (
    _WINDOWS
    + """
if start ~= minute then
  if minute - start == 60 then
    redis.call('HSET', h, 'rp', redis.call('HGET', h, 'rc') or 0, 'tp', redis.call('HGET', h, 'tc') or 0)
  else
    redis.call('HSET', h, 'rp', 0, 'tp', 0)
  end
  redis.call('HSET', h, 'rc', 0, 'tc', 0, 'start', minute)
  redis.call('EXPIRE', h, 180)
end
-- as seconds_until_fits; a need over the limit never gets here (refuse_if_never_fits)
local function wait(limit, need, prev, curr)
  if curr + need <= limit then
    if prev <= 0 then return 0 end
    return math.max(0, 60 * (1 - (limit - curr - need) / prev) - elapsed)
  end
  local later = 0
  if curr > 0 then later = math.max(0, 60 * (1 - (limit - need) / curr)) end
  return (60 - elapsed) + later
end
local checks = {{'rpm', tonumber(ARGV[1]), 1, 'rp', 'rc'}, {'tpm', tonumber(ARGV[2]), tonumber(ARGV[4]), 'tp', 'tc'}}
for _, c in ipairs(checks) do
  if c[2] >= 0 then
    local prev = tonumber(redis.call('HGET', h, c[4]) or '0')
    local curr = tonumber(redis.call('HGET', h, c[5]) or '0')
    if prev * (1 - elapsed / 60) + curr + c[3] > c[2] then
      return {0, c[1], tostring(wait(c[2], c[3], prev, curr))}
    end
  end
end
local conc = tonumber(ARGV[3])
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {0, 'concurrency', '1'} end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[6])) + 60)
end
-- charge, and say what each window has left (-1: no such limit)
local left = {-1, -1}
for i, c in ipairs(checks) do
  if c[2] >= 0 then
    local curr = tonumber(redis.call('HINCRBYFLOAT', h, c[5], c[3]))
    local prev = tonumber(redis.call('HGET', h, c[4]) or '0')
    left[i] = math.max(0, math.floor(c[2] - prev * (1 - elapsed / 60) - curr))
  end
end
return {1, '', '0', left[1], left[2], tostring(minute)}
"""
)

# KEYS[1] = windows hash; ARGV = rpm, tpm (-1 = none). What each window has left, as
# _ACQUIRE would see it, changing nothing.
_LEFT = (
    _WINDOWS
    + """
local function used(pf, cf)
  local prev = tonumber(redis.call('HGET', h, pf) or '0')
  local curr = tonumber(redis.call('HGET', h, cf) or '0')
  if start ~= minute then
    if minute - start == 60 then prev = curr else prev = 0 end
    curr = 0
  end
  return prev * (1 - elapsed / 60) + curr
end
local left = {-1, -1}
local checks = {{tonumber(ARGV[1]), 'rp', 'rc'}, {tonumber(ARGV[2]), 'tp', 'tc'}}
for i, c in ipairs(checks) do
  if c[1] >= 0 then left[i] = math.max(0, math.floor(c[1] - used(c[2], c[3]))) end
end
return left
"""
)

# ARGV = slot id, token delta (actual - charged), track tpm (1/0), the minute charged
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  -- the true-up goes to the minute that was charged: the current window's count while
  -- the hash is still in that minute, the previous one's once it has rolled past it
  local start = tonumber(redis.call('HGET', KEYS[1], 'start') or '0')
  local charged = tonumber(ARGV[4])
  local field = nil
  if start == charged then field = 'tc' elseif start - charged == 60 then field = 'tp' end
  if field then
    local n = tonumber(redis.call('HGET', KEYS[1], field) or '0') + tonumber(ARGV[2])
    if n < 0 then n = 0 end
    redis.call('HSET', KEYS[1], field, n)
  end
end
return 1
"""


class RedisLimiter:
    """Limits shared by every replica through Redis.

    Args:
        client: a ``redis.asyncio.Redis``.
        prefix: key prefix.
        lease_seconds: a concurrency slot not released within this long is freed.
        retries: whose give-backs free the slot an admission may have taken though its
            reply was lost (None: retries of its own, tried once more by :meth:`aclose`).
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "llmrouter:",
        lease_seconds: float = 900.0,
        retries: Retries | None = None,
    ) -> None:
        self._redis = client
        self._prefix = f"{prefix}limits:"
        self._lease = lease_seconds
        self._own_retries = retries is None
        self._retries = retries if retries is not None else Retries()
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._left = client.register_script(_LEFT)

    def _keys(self, subject: str) -> list[str]:
        base = f"{self._prefix}{{{subject}}}"
        return [base, f"{base}:slots"]

    async def acquire(self, subject: str, limits: EffectiveLimits, tokens: int) -> LimitTicket:
        refuse_if_never_fits(limits, tokens)  # no round trip for what no window can take
        slot = new_id()
        args = [
            -1 if limits.rpm is None else limits.rpm,
            -1 if limits.tpm is None else limits.tpm,
            -1 if limits.concurrency is None else limits.concurrency,
            tokens,
            slot,
            self._lease,
        ]
        keys = self._keys(subject)
        try:
            ok, kind, wait, *rest = await self._acquire(keys=keys, args=args)
        except BaseException as exc:
            if limits.concurrency is not None and may_have_reached(exc):
                self._free_slot(keys[1], slot)
            raise
        if int(ok) != 1:
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            limit = {"rpm": limits.rpm, "tpm": limits.tpm, "concurrency": limits.concurrency}[kind]
            raise _refusal(kind, limit or 0, float(wait))
        requests_left, tokens_left = (int(n) if int(n) >= 0 else None for n in rest[:2])
        return LimitTicket(
            subject,
            limits,
            tokens,
            slot=slot,
            requests_left=requests_left,
            tokens_left=tokens_left,
            minute=float(rest[2]),
        )

    def _free_slot(self, slots: str, slot: str) -> None:
        """Free ``slot`` after its admission failed or was cancelled: the script may have
        run though its reply never came (a timeout, a connection cut, the client gone),
        and a slot kept would refuse the key's requests for the whole lease (15 minutes
        with ``concurrency: 1``). Freeing a slot never taken changes nothing. In the
        background (:class:`~llmrouter.accounting.retries.GiveBacks`): the request's
        error goes on at once, not after a second wait on a Redis that stopped answering.
        """
        self._retries.give_backs.add(partial(self._redis.zrem, slots, slot))

    async def release(self, ticket: LimitTicket, actual_tokens: int) -> None:
        track = "1" if ticket.limits.tpm is not None else "0"
        await self._release(
            keys=self._keys(ticket.subject),
            args=[ticket.slot, actual_tokens - ticket.tokens, track, repr(ticket.minute)],
        )

    async def window_headers(self, subject: str, limits: EffectiveLimits) -> dict[str, str]:
        if limits.rpm is None and limits.tpm is None:
            return {}
        args = [-1 if limits.rpm is None else limits.rpm, -1 if limits.tpm is None else limits.tpm]
        requests_left, tokens_left = await self._left(keys=self._keys(subject)[:1], args=args)
        return _limit_headers(limits, int(requests_left), int(tokens_left))  # -1 where no limit: not sent

    async def aclose(self) -> None:
        """Tries its own retries once more; the client belongs to the caller."""
        if self._own_retries:
            await self._retries.aclose()
