"""Finding a task id in a reply, and the shortcuts that skip parsing when none can be there."""

from __future__ import annotations

import pytest

from gateway.proxy.forwarding import find_task_id


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"task_id": "t1"}', "t1"),
        (b'{"success": true, "data": {"task_id": 42}}', "42"),
        (b'{"\\u0074ask_id": "escaped"}', "escaped"),  # the key written with an escape still counts
        (b'{"data": {"task\\u005fid": "t2"}}', "t2"),
        (b'{"id": "t3", "note": "no task here"}', None),
        (b'{"task_id": true}', None),
        (b'{"task_id": ""}', None),
        (b'["task_id"]', None),
        (b"task_id but not JSON", None),
    ],
)
def test_task_ids_are_found_where_they_are_and_nowhere_else(payload, expected):
    assert find_task_id(payload) == expected
