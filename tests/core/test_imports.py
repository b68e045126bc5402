import subprocess
import sys

import llmrouter

HEAVY = (
    "torch",
    "vllm",
    "transformers",
    "litestar",
    "sqlalchemy",
    "sqlmodel",
    "opentelemetry",
    "redis",
    "uvicorn",
    "importlib.metadata",  # entry points are read when a router is built (~25 ms to import)
    "llmrouter.cache.layer",  # the cache loads when used; config needs only its settings
)


def test_import_llmrouter_loads_nothing_heavy():
    code = f"import sys, llmrouter; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_all_is_exported():
    for name in llmrouter.__all__:
        assert hasattr(llmrouter, name), name
