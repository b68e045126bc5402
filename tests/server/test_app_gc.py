"""The service tunes the garbage collector once started (server.gc_tuning)."""

import gc

import msgspec
import pytest
from litestar.testing import TestClient

from llmrouter.config import Config, ServerConfig
from llmrouter.server.app import GC_YOUNG_THRESHOLD, create_app


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_started_service_freezes_and_raises_the_young_threshold(restore_gc) -> None:
    gc.unfreeze()
    config = Config(discover=False)
    with TestClient(create_app(config)):
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD


def test_gc_tuning_off_leaves_the_collector_alone(restore_gc) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    config = msgspec.structs.replace(Config(discover=False), server=ServerConfig(gc_tuning=False))
    with TestClient(create_app(config)):
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == before
