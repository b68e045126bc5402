"""Live state of deployments and model groups: in-flight, cooldown, latency EWMA.

The router keeps one :class:`DeploymentState` per deployment; strategies read it,
attempts update it. Everything here runs on the event loop (no locks needed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from llmrouter.config import Cooldown, Deployment, ModelGroup, Retry, Timeouts
from llmrouter.errors import NoDeploymentAvailableError
from llmrouter.provider import Capabilities, Provider
from llmrouter.strategies import Strategy

__all__ = ["DeploymentState", "GroupState"]

# Weight of the newest sample in the latency averages: recent enough to follow a slowing
# upstream within a handful of requests, smooth enough to ignore one outlier.
EWMA_ALPHA = 0.3


def _ewma(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + EWMA_ALPHA * (sample - previous)


@dataclass(eq=False)
class DeploymentState:
    """One deployment: its provider, config, price and live numbers."""

    id: str
    group: str
    index: int
    config: Deployment
    provider: Provider[Any]
    price: Any = None
    in_flight: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    ewma_ttft: float | None = None
    ewma_duration: float | None = None
    requests: int = 0
    failures: int = 0
    started: bool = False
    start_error: str | None = None
    limits: Capabilities | None = None
    """The provider's capabilities, read when it started, when they rule out some
    requests (None: it serves every request, and the attempt plan checks nothing)."""

    def cooling(self, now: float) -> bool:
        return now < self.cooldown_until

    def full(self) -> bool:
        limit = self.config.max_concurrency
        return limit is not None and self.in_flight >= limit

    def usable(self, now: float) -> bool:
        # Started: a deployment added to a live group is not sent a request until a
        # request's admission has started it (one admitted before it was added does not
        # start it, and skips it until then).
        return self.started and not self.cooling(now) and not self.full()

    def record_ttft(self, ttft: float) -> None:
        """A first token came after ``ttft`` seconds: recorded as it comes, not at the end
        of the stream, or a deployment whose clients close their streams early stays
        unmeasured (first in ``lowest_latency``) forever."""
        self.ewma_ttft = _ewma(self.ewma_ttft, ttft)

    def record_success(self, duration: float) -> None:
        self.requests += 1
        self.consecutive_failures = 0
        self.ewma_duration = _ewma(self.ewma_duration, duration)

    def record_timeout(self, elapsed: float) -> None:
        """Count an attempt our own time limit cut in the latency averages, both of them:
        it took at least that long. Learnt from successes alone, a deployment that got
        slow kept its old fast average and was tried first again after every cooldown."""
        self.record_ttft(elapsed)
        self.ewma_duration = _ewma(self.ewma_duration, elapsed)

    def record_failure(self, cooldown: Cooldown) -> bool:
        """Count a failure; True when it puts the deployment into cooldown."""
        self.requests += 1
        self.failures += 1
        self.consecutive_failures += 1
        if cooldown.failures > 0 and self.consecutive_failures >= cooldown.failures:
            self.cooldown_until = time.monotonic() + cooldown.seconds
            self.consecutive_failures = 0
            return True
        return False

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "provider": self.config.provider,
            "model": self.config.model,
            "healthy": self.start_error is None and not self.cooling(now),
            "in_flight": self.in_flight,
            "max_concurrency": self.config.max_concurrency,
            "cooldown_s": round(max(0.0, self.cooldown_until - now), 3),
            "consecutive_failures": self.consecutive_failures,
            "requests": self.requests,
            "failures": self.failures,
            "ewma_ttft_ms": None if self.ewma_ttft is None else round(self.ewma_ttft * 1000, 2),
            "ewma_duration_ms": None if self.ewma_duration is None else round(self.ewma_duration * 1000, 2),
            "error": self.start_error,
        }


@dataclass(eq=False)
class GroupState:
    """A model group: its deployments and the policies that apply to them."""

    name: str
    config: ModelGroup
    strategy: Strategy
    retry: Retry
    timeouts: Timeouts
    cooldown: Cooldown
    deployments: list[DeploymentState] = field(default_factory=list)
    direct: bool = False
    """A ``provider/model`` name a client sent, not a configured group."""
    admitted: int = 0
    """Requests admitted to this group and not yet settled, counted for a direct
    ``provider/model`` group only: one holding any is not evicted."""
    _slot_freed: anyio.Event | None = None

    def timeouts_for(self, deployment: DeploymentState) -> Timeouts:
        """The deployment's own timeouts, else the group's (which default to the router's)."""
        return deployment.config.timeouts or self.timeouts

    def ordered(self, exclude: Sequence[DeploymentState] = ()) -> list[DeploymentState]:
        """Usable deployments, most preferred first, not counting ``exclude``."""
        now = time.monotonic()
        return self.strategy([d for d in self.deployments if d.usable(now) and d not in exclude])

    async def select(
        self, tried: Sequence[DeploymentState], exhausted: Sequence[DeploymentState]
    ) -> DeploymentState:
        """The deployment for the next attempt.

        Untried deployments come first; a deployment already tried may be used again
        (retryable failures) unless it is in ``exhausted``. When every candidate is at its
        concurrency limit, waits for a slot or for a cooldown to end, whichever comes
        first (bounded by the first-token timeout, else by the total one).

        Raises:
            NoDeploymentAvailableError: every deployment is cooling down, failed to start,
                or stayed full for the whole wait.
        """
        picked = self._pick(tried, exhausted)
        if picked is not None:
            return picked
        # Only a full deployment is worth waiting for; the cancel scope is kept off the
        # common path above, where it would cost more than the pick itself. Without a
        # first-token timeout, the total one still bounds the wait.
        wait = self.timeouts.first_token
        with anyio.move_on_after(self.timeouts.total if wait is None else wait):
            while self._waiting_for_slot(exhausted):
                if self._slot_freed is None:
                    self._slot_freed = anyio.Event()
                # Nothing sets an event when a cooldown ends: without this bound a
                # deployment back from one idled while the request waited for a full one.
                with anyio.move_on_after(self._until_cooldown_ends(exhausted)):
                    await self._slot_freed.wait()
                picked = self._pick(tried, exhausted)
                if picked is not None:
                    return picked
        raise self._unavailable()

    def _pick(
        self, tried: Sequence[DeploymentState], exhausted: Sequence[DeploymentState]
    ) -> DeploymentState | None:
        fresh = self.ordered(exclude=[*tried, *exhausted])
        if fresh:
            return fresh[0]
        again = self.ordered(exclude=exhausted)
        return again[0] if again else None

    def _waiting_for_slot(self, exhausted: Sequence[DeploymentState]) -> bool:
        now = time.monotonic()
        return any(
            d.full() and d.started and not d.cooling(now) and d not in exhausted for d in self.deployments
        )

    def _until_cooldown_ends(self, exhausted: Sequence[DeploymentState]) -> float | None:
        """Seconds until the first cooldown of a deployment this request may use ends."""
        now = time.monotonic()
        ends = [
            d.cooldown_until - now
            for d in self.deployments
            if d.cooling(now) and d.started and d not in exhausted
        ]
        return min(ends, default=None)

    def _unavailable(self) -> NoDeploymentAvailableError:
        now = time.monotonic()
        cooling = [d.cooldown_until - now for d in self.deployments if d.cooling(now)]
        retry_after = min(cooling) if cooling else None
        return NoDeploymentAvailableError(
            f"no deployment of model {self.name!r} is available right now", retry_after=retry_after
        )

    def acquire(self, deployment: DeploymentState) -> None:
        deployment.in_flight += 1

    def release(self, deployment: DeploymentState) -> None:
        deployment.in_flight -= 1
        if self._slot_freed is not None:
            # Wake every waiter; each re-checks capacity, and the next waiter makes a fresh event.
            self._slot_freed.set()
            self._slot_freed = None
