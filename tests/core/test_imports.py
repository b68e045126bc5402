import importlib
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("package", ["llmrouter.accounting", "llmrouter.cache", "llmrouter.telemetry"])
def test_lazy_packages_export_everything_they_list(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018
