"""benchmarks/gateway_instructions.py --without names code by its module and attribute:
a rename must show here, not in a valgrind run minutes into a benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway_instructions.py"


def test_every_part_the_benchmark_can_replace_exists() -> None:
    spec = importlib.util.spec_from_file_location("gateway_instructions", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert len(script.PARTS) >= 10
    for what, target, _stand_in in script.PARTS.values():
        owner, attribute = script.resolve(target)
        assert callable(getattr(owner, attribute)), (what, target)
