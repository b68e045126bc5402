"""Loading notices: through logging where the process set it up (``llmrouter serve``'s
JSON lines, which transformers' progress bars would break), else plain stderr lines."""

from __future__ import annotations

import logging

import pytest
from llmrouter_transformers.notices import notice, quiet_progress_bars, stray_bars_dropped
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


def test_with_logging_set_up_transformers_warnings_are_records_and_stray_bars_dropped(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from tqdm.auto import tqdm

    try:
        with caplog.at_level(logging.WARNING):
            quiet_progress_bars()
            transformers_logging.get_logger("transformers.quantizers").warning(
                "packed weights are fastest in float32"
            )
            with stray_bars_dropped():
                for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
                    pass
        assert "packed weights are fastest in float32" in [r.getMessage() for r in caplog.records]
        assert capsys.readouterr().err == ""  # neither transformers' own handler nor the bar wrote
    finally:
        transformers_logging.enable_progress_bar()
        transformers_logging.enable_default_handler()
        transformers_logging.disable_propagation()
