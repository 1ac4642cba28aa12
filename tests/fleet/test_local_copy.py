"""The host's copy of Redis's fleet (fleet/local_copy.py): written when a record moves, read without Redis."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from conftest import SECRET, wait_until

from gateway.fleet.local_copy import LocalCopy, copy_path
from gateway.fleet.redis_store import Snapshot
from gateway.fleet.registry import Registry

WHERE = "127.0.0.1:6379/0 gpu-gateway:"


def record(server_id: str, port: int = 8000) -> bytes:
    entry = {"server_id": server_id, "ip": "127.0.0.1", "port": port, "is_healthy": True, "registered_at": "x"}
    return json.dumps(entry).encode()


def snapshot(version: int, *records: tuple[str, int, bytes]) -> Snapshot:
    return Snapshot(version, list(records), {}, {"at": 1.0}, {})


def test_the_copy_sits_beside_the_embedded_modes_file():
    assert str(copy_path("/var/lib/gpu-gateway/backend_servers.json")) == (
        "/var/lib/gpu-gateway/backend_servers.redis-copy.json"
    )
    assert str(copy_path("fleet")) == "fleet.redis-copy.json"


def test_what_is_kept_reads_back_as_the_same_records(tmp_path):
    copy = LocalCopy(tmp_path / "backend_servers.redis-copy.json", WHERE)
    assert copy.read() is None  # none kept yet
    kept = snapshot(7, ("B1", 3, record("B1")), ("B2", 7, record("B2", 8001)))
    copy.keep(kept)
    read = copy.read()
    assert read is not None
    assert (read.version, read.records) == (7, kept.records)
    assert (read.readings, read.sweep, read.ejections) == ({}, {}, {})  # times of another process: not kept


def test_a_snapshot_whose_records_did_not_move_is_not_written_again(tmp_path):
    path = tmp_path / "copy.json"
    copy = LocalCopy(path, WHERE)
    copy.keep(snapshot(7, ("B1", 3, record("B1"))))
    path.unlink()
    copy.keep(snapshot(8, ("B1", 3, record("B1"))))  # only a sweep's readings moved the version
    assert not path.exists()
    copy.keep(snapshot(9, ("B1", 9, record("B1", 8002))))  # the record changed
    assert copy.read().records == [("B1", 9, record("B1", 8002))]
    copy.keep(snapshot(10))  # and a removal is a change too
    assert copy.read().records == []


@pytest.mark.parametrize(
    "text",
    ["", "{", "[]", '{"version": 1}', '{"version": 1, "records": [{"rev": 1}]}', '{"version": 1, "records": []}'],
)
def test_a_copy_that_cannot_be_read_is_left_unused(tmp_path, caplog, text):
    path = tmp_path / "copy.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, "gateway.fleet.local_copy"):
        assert LocalCopy(path, WHERE).read() is None
    assert "cannot be read" in caplog.text


def test_a_copy_of_another_fleets_is_left_unused(tmp_path, caplog):
    path = tmp_path / "copy.json"
    LocalCopy(path, "127.0.0.1:6379/0 other-fleet:").keep(snapshot(5, ("B1", 5, record("B1"))))
    with caplog.at_level(logging.WARNING, "gateway.fleet.local_copy"):
        assert LocalCopy(path, WHERE).read() is None
    assert "not of 127.0.0.1:6379/0 gpu-gateway:" in caplog.text


def test_a_copy_that_cannot_be_written_is_said_once_and_tried_again(tmp_path, caplog):
    folder = tmp_path / "gone"
    copy = LocalCopy(folder / "copy.json", WHERE)
    with caplog.at_level(logging.WARNING, "gateway.fleet.local_copy"):
        copy.keep(snapshot(1, ("B1", 1, record("B1"))))
        copy.keep(snapshot(2, ("B1", 1, record("B1"))))
    assert caplog.text.count("could not keep") == 1
    folder.mkdir()
    copy.keep(snapshot(3, ("B1", 1, record("B1"))))  # the same records: written now, since none were before
    assert copy.read().records == [("B1", 1, record("B1"))]
    assert list(folder.iterdir()) == [folder / "copy.json"]  # no temp file left behind


def test_a_registry_on_the_copy_takes_all_of_redis_s_fleet_once_it_answers(redis_server):
    from gateway.cluster.connection import Redis
    from gateway.fleet.redis_store import RedisFleetStore

    registry = Registry(threading.Lock(), lambda: None)
    registry.store = RedisFleetStore(Redis(redis_server.url, "copy-test:", 1.0))
    registry.adopt_copy(snapshot(50, ("B1", 40, record("B1")), ("B2", 50, record("B2", 8001))))
    assert list(registry.servers) == ["B1", "B2"]
    assert registry.shared_version == 0  # Redis's fleet, at any version, is newer than the copy
    fresh = snapshot(3, ("B1", 2, record("B1", 9000)))  # say Redis lost its data and started again
    assert registry.adopt(fresh)
    assert list(registry.servers) == ["B1"]
    assert registry.servers["B1"].port == 9000  # read again, though the copy had a record of B1


def test_a_process_that_missed_the_last_change_before_redis_went_takes_the_copy(make_app, redis_server, tmp_path):
    """A sibling read the change and wrote it to the copy; this process's read found Redis gone."""
    settings = {"redis_url": redis_server.url, "redis_timeout": 0.5}
    settings["backend_servers_file"] = str(tmp_path / "backend_servers.json")
    a, b = make_app(**settings), make_app(**settings)
    manager_b = b.extensions["backend_manager"]
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000, "secret": SECRET}
    assert a.test_client().post("/webhook/register", json=body).status_code == 200
    assert wait_until(lambda: manager_b.get_server("B1") is not None, timeout=2)
    manager_b.follower.stop()  # as if B2's message reached B just as Redis went
    manager_b.follower._thread.join(timeout=5)  # a message read in its last poll would still be taken
    assert a.test_client().post("/webhook/register", json={**body, "server_id": "B2"}).status_code == 200
    copy = tmp_path / "backend_servers.redis-copy.json"
    assert wait_until(lambda: '"B2"' in copy.read_text(), timeout=2)  # A's follower wrote it
    redis_server.kill()
    assert [s.server_id for s in manager_b.list_servers()] == ["B1"]
    manager_b.follower.down()  # what B's follower calls when its read finds Redis down
    assert [s.server_id for s in manager_b.list_servers()] == ["B1", "B2"]
    manager_b.follower.down()  # the same copy again: nothing more to take
    assert manager_b.registry.shared_version == 0  # and Redis's fleet replaces it all once it answers
