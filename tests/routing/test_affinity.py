"""TaskAffinity: records survive reopening, expire, and a corrupt store is moved aside."""

import time

from gateway.routing.affinity import TaskAffinity


def test_record_and_look_up(tmp_path):
    affinity = TaskAffinity(tmp_path / "t.db")
    affinity.record("task-1", "B1")
    affinity.record("task-2", "B2")
    assert affinity.owner("task-1") == "B1"
    assert affinity.owner("nope") is None
    assert affinity.first_owned(["api", "status", "task-2", "task-1"]) == ("task-2", "B2")
    assert affinity.first_owned(["api", "x"]) is None
    affinity.close()


def test_records_survive_reopening(tmp_path):
    affinity = TaskAffinity(tmp_path / "t.db")
    affinity.record("task-1", "B1")
    affinity.close()
    reopened = TaskAffinity(tmp_path / "t.db")
    assert reopened.owner("task-1") == "B1"
    reopened.close()


def test_records_expire(tmp_path):
    affinity = TaskAffinity(tmp_path / "t.db", ttl=0.2)
    affinity.record("task-1", "B1")
    assert affinity.owner("task-1") == "B1"
    time.sleep(0.3)
    assert affinity.owner("task-1") is None
    assert affinity.purge_expired() == 1
    affinity.close()


def test_overlong_candidates_are_ignored(tmp_path):
    affinity = TaskAffinity(tmp_path / "t.db")
    assert affinity.first_owned(["x" * 10_000]) is None
    assert affinity.owner("x" * 10_000) is None
    affinity.close()


def test_corrupt_store_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database" * 100)
    affinity = TaskAffinity(path)
    affinity.record("task-1", "B1")
    assert affinity.owner("task-1") == "B1"
    assert len(list(tmp_path.glob("t.db.corrupt-*"))) == 1
    assert "corrupt" in caplog.text
    affinity.close()
