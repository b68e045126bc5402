"""Fixtures for the service tests: the fake upstream and the app served by uvicorn."""

from __future__ import annotations

from typing import Any

import pytest

from llmrouter.testing.serve import serve_app


@pytest.fixture(name="serve_app")
def serve_app_fixture() -> Any:
    return serve_app
