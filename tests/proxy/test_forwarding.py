"""Finding a task id in a reply, and the shortcuts that skip parsing when none can be there."""

from __future__ import annotations

import pytest

from gateway.proxy.forwarding import climbs, find_task_id


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


@pytest.mark.parametrize(
    "segment",
    [
        "..",
        ".",
        "..;",
        "..;jsessionid=1",
        ".;x",
        "%2e%2e",
        "%252e%252e",
        "%25252e%25252e",
        "..\\x",
        "a/../b",
        "%2e%2e%3bx",
    ],
)
def test_segments_some_backend_takes_as_climbing_are_caught(segment):
    from urllib.parse import unquote

    assert climbs(unquote(segment))


@pytest.mark.parametrize("segment", ["...", "..a", "a..", "v1.2", ".hidden", "50%25", "%252Fslash", "a;b=c"])
def test_segments_with_dots_that_climb_nowhere_pass(segment):
    from urllib.parse import unquote

    assert not climbs(unquote(segment))
