"""Loading notices: through logging where the process set it up (``llmrouter serve``'s
JSON lines, which transformers' progress bars would break), else plain stderr lines."""

from __future__ import annotations

import logging

import pytest
from llmrouter_transformers.notices import notice, quiet_progress_bars
from transformers.utils import logging as transformers_logging


def test_with_logging_set_up_notices_are_records_and_bars_are_off(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        with caplog.at_level(logging.INFO, logger="llmrouter.transformers"):
            notice("loading m on cpu (float32) ...")
            quiet_progress_bars()
        assert [r.getMessage() for r in caplog.records] == ["loading m on cpu (float32) ..."]
        assert capsys.readouterr().err == ""
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()


def test_without_logging_notices_are_plain_lines_and_bars_stay(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    notice("loaded m (0.1M parameters) in 0.2 s")
    quiet_progress_bars()
    assert capsys.readouterr().err == "llmrouter-transformers: loaded m (0.1M parameters) in 0.2 s\n"
    assert transformers_logging.is_progress_bar_enabled()
