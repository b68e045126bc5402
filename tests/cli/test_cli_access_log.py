"""`llmrouter serve --no-access-log` writes no per-request line, uvicorn's included.

JSON logging routes uvicorn's loggers to the root handler, which once revived uvicorn's
access line on every request; only the real CLI start-up order shows it.
"""

import httpx

from .conftest import llmrouter_serve, write_config


def test_no_access_lines_with_json_logs(tmp_path, fake):
    config = write_config(
        tmp_path / "llmrouter.yaml",
        fake.base_url,
        accounting={"enabled": False},
        telemetry={"metrics": True, "json_logs": True, "access_log": True},
    )
    with llmrouter_serve(config) as served:
        for _ in range(3):
            body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(f"{served.url}/v1/chat/completions", json=body).status_code == 200
    assert "Application startup complete" in served.output
    assert "uvicorn.access" not in served.output and "/v1/chat/completions" not in served.output
