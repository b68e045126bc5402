"""How ``llmrouter bench --providers`` turns runs into rows, with a scripted subject."""

from __future__ import annotations

import pytest

from llmrouter.bench.providers import Sample, format_provider_rows, load_bench, measure_subject
from llmrouter.errors import ConfigError

pytestmark = pytest.mark.anyio


class Scripted:
    """Generates nothing: every request "took" its ttft, and the run's wall time is read
    from a fake clock that each call advances."""

    label = "scripted model"

    def __init__(self, clock: list[float], seconds: dict[str, float]) -> None:
        self.clock, self.seconds = clock, seconds
        self.calls: list[tuple[str, int]] = []

    async def _run(self, path: str, concurrency: int, tokens: int) -> list[Sample]:
        self.calls.append((path, concurrency))
        self.clock[0] += self.seconds[path]
        return [Sample(tokens, self.seconds[path] / 2)] * concurrency

    async def raw(self, concurrency: int, tokens: int) -> list[Sample]:
        return await self._run("raw", concurrency, tokens)

    async def provider(self, concurrency: int, tokens: int) -> list[Sample]:
        return await self._run("provider", concurrency, tokens)


async def test_rows_come_from_alternating_rounds_after_a_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("llmrouter.bench.providers.time.perf_counter", lambda: clock[0])
    subject = Scripted(clock, {"raw": 0.5, "provider": 0.625})
    rows = await measure_subject("fake", subject, [1, 4], tokens=10, requests=8, rounds=2)
    # Per concurrency: one warm-up run per path, then rounds alternating raw and provider;
    # a run is requests // concurrency waves (8 at concurrency 1, 2 at 4).
    expected = [("raw", 1), ("provider", 1)] + ([("raw", 1)] * 8 + [("provider", 1)] * 8) * 2
    expected += [("raw", 4), ("provider", 4)] + ([("raw", 4)] * 2 + [("provider", 4)] * 2) * 2
    assert subject.calls == expected
    by = {(r.path, r.concurrency): r for r in rows}
    assert by[("raw", 1)].tokens_per_s == pytest.approx(10 / 0.5)
    assert by[("provider", 1)].tokens_per_s == pytest.approx(10 / 0.625)
    assert by[("raw", 4)].tokens_per_s == pytest.approx(40 / 0.5)
    assert by[("provider", 4)].vs_raw == pytest.approx(-0.2)
    assert by[("raw", 4)].vs_c1 == pytest.approx(4.0) and by[("raw", 1)].vs_raw is None
    assert by[("provider", 1)].ttft_p50_ms == pytest.approx(312.5)
    assert by[("raw", 4)].tokens_per_request == 10 and by[("raw", 4)].rounds_tokens_per_s == [80.0, 80.0]
    table = format_provider_rows(rows)
    assert "-20.0%" in table and "4.00x" in table and "fake: scripted model" in table


async def test_a_run_that_generates_nothing_is_an_error() -> None:
    class Silent(Scripted):
        async def provider(self, concurrency: int, tokens: int) -> list[Sample]:
            return [Sample(0, 0.1)] * concurrency

    with pytest.raises(RuntimeError, match="provider run at concurrency 2"):
        await measure_subject("fake", Silent([0.0], {"raw": 0.1}), [2], tokens=4, requests=2, rounds=1)


def test_an_unknown_provider_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no benchmark for provider 'nope'"):
        load_bench("nope")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-gateway"], "nothing to measure: --no-gateway without --providers or --coalescing"),
        (["--providers", "transformers,nope"], "no benchmark for provider 'nope'"),
    ],
)
def test_the_command_refuses_before_measuring(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmrouter.cli import main

    assert main(["bench", *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "0"], "argument --concurrency: expected a whole number of at least 1, not '0'"),
        (["--provider-concurrency", "1,x"], "argument --provider-concurrency: expected a whole number"),
        (["--provider-requests", "-2"], "argument --provider-requests: expected a whole number"),
        (["--duration", "nan"], "argument --duration: expected a positive number of seconds"),
        (["--concurrency", ","], "argument --concurrency: expected at least one number"),
        # These two were tracebacks, the second after the whole run.
        (["--modes", "bare,nope"], "argument --modes: expected some of bare, full, accounting"),
        (["--json", "/nonexistent/results.json"], "argument --json: cannot write a file at"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmrouter.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
