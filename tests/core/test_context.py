"""Request ids."""

import time

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
