"""Request ids."""

import time

import pytest

import llmrouter.ids as ids
from llmrouter.context import RequestContext, new_id


def test_new_ids_are_unique_hex_and_sort_by_creation_time() -> None:
    ids = []
    for _ in range(1000):
        ids.append(new_id())
        if len(ids) % 100 == 0:
            time.sleep(0.001)
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    firsts = ids[::100]
    assert firsts == sorted(firsts), "ids made a millisecond apart sort in that order"
    assert RequestContext().request_id != RequestContext().request_id


def test_random_hex_keeps_leading_zeros_and_is_never_all_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "getrandbits", lambda bits: 0xAB)
    assert ids.random_hex(16) == "00000000000000ab"
    monkeypatch.setattr(ids, "getrandbits", lambda bits: 0)
    assert ids.random_hex(32) == "0" * 31 + "1"  # an all-zero W3C id is invalid


def test_new_id_is_time_then_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: 0x1234)
    monkeypatch.setattr(ids, "getrandbits", lambda bits: 0x5)
    assert ids.new_id() == "0000000000001234" + "0000000000000005"
