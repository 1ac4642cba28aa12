"""JsonFileStore: atomic saves, stale temp files, and corrupt files moved aside."""

import json
import random
import subprocess
import sys
import threading

import pytest
from conftest import ROOT

from gateway.fleet.store import JsonFileStore, StoreError, off_the_event_loop

ENTRY = {"server_id": "B1", "ip": "127.0.0.1", "port": 8000}


def test_missing_file_loads_empty(tmp_path):
    assert JsonFileStore(tmp_path / "s.json").load() == []


def test_save_then_load_round_trips(tmp_path):
    store = JsonFileStore(tmp_path / "s.json")
    store.save([ENTRY])
    assert store.load() == [ENTRY]
    assert json.loads((tmp_path / "s.json").read_text()) == [ENTRY]


def test_save_leaves_no_temp_files(tmp_path):
    store = JsonFileStore(tmp_path / "s.json")
    for i in range(5):
        store.save([{**ENTRY, "port": 8000 + i}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_failed_save_keeps_the_old_file_and_removes_its_temp(tmp_path):
    store = JsonFileStore(tmp_path / "s.json")
    store.save([ENTRY])
    with pytest.raises(TypeError):
        store.save([{"server_id": object()}])  # not JSON-serialisable: fails mid-write
    assert store.load() == [ENTRY]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_stale_temp_files_are_removed_at_load(tmp_path):
    store = JsonFileStore(tmp_path / "s.json")
    store.save([ENTRY])
    stale = tmp_path / ".s.json.abc123.tmp"
    stale.write_text("[{half")
    unrelated = tmp_path / ".other.json.abc.tmp"
    unrelated.write_text("keep")
    assert store.load() == [ENTRY]
    assert not stale.exists()
    assert unrelated.exists()


@pytest.mark.parametrize("content", ["{not json", "", '{"server_id": "B1"}', '"text"', "5"])
def test_corrupt_file_is_moved_aside_not_overwritten(tmp_path, content, caplog):
    path = tmp_path / "s.json"
    path.write_text(content)
    store = JsonFileStore(path)
    assert store.load() == []
    aside = list(tmp_path.glob("s.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text() == content
    assert not path.exists()
    assert "corrupt" in caplog.text
    store.save([ENTRY])
    assert aside[0].read_text() == content


UNREADABLE = [
    pytest.param(random.Random(12).randbytes(4096), id="random-bytes"),
    pytest.param('[{"server_id": "B1", "labels": {"city": "Zürich"}}]'.encode()[:-9], id="cut-in-a-character"),
    pytest.param('[{"server_id": "B1", "labels": {"city": "Zürich"}}]'.encode("latin-1"), id="latin-1"),
    pytest.param(json.dumps([ENTRY]).encode("utf-16"), id="utf-16"),
    pytest.param(json.dumps([ENTRY]).encode("utf-16-le"), id="utf-16-without-bom"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="lists-nested-100000-deep"),
    pytest.param(b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, id="objects-nested-100000-deep"),
]


@pytest.mark.parametrize("content", UNREADABLE)
def test_unreadable_content_is_moved_aside_and_loads_empty(tmp_path, content, caplog):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    store = JsonFileStore(path)

    assert store.load() == []  # no UnicodeDecodeError or RecursionError that stops the start

    (aside,) = tmp_path.glob("s.json.corrupt-*")
    assert aside.read_bytes() == content
    assert not path.exists()
    assert "corrupt" in caplog.text
    store.save([ENTRY])
    assert store.load() == [ENTRY]


def test_a_list_is_returned_as_it_is_for_the_caller_to_check_each_entry(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([ENTRY, 5, "x"]))

    assert JsonFileStore(path).load() == [ENTRY, 5, "x"]
    assert path.exists()


def test_unreadable_file_stops_the_start_even_as_root(tmp_path):
    path = tmp_path / "s.json"
    path.mkdir()  # a folder where the file should be: unreadable as a file for anyone
    with pytest.raises(StoreError):
        JsonFileStore(path).load()
    assert path.is_dir()


GEVENT_PROBE = """
from gevent import monkey
monkey.patch_all()
import sys, gevent
from gevent.monkey import get_original
from gateway.fleet.store import off_the_event_loop

native_sleep = get_original("time", "sleep")  # blocks its OS thread, as an fsync does
ticks = []

def ticker():
    while True:
        ticks.append(1)
        gevent.sleep(0.01)

def slow_save(value):
    native_sleep(0.5)
    return value * 2

def blocked_save(value):
    native_sleep(0.5)
    return value

def seen_during(call):
    runner = gevent.spawn(ticker)
    gevent.sleep(0)
    before = len(ticks)
    result = call()
    during = len(ticks) - before
    runner.kill()
    return result, during

result, during = seen_during(lambda: off_the_event_loop(slow_save, 21))
direct, blocked = seen_during(lambda: blocked_save(7))
print(result, during > 3, direct, blocked)
"""


def test_under_gevent_a_save_runs_beside_other_requests_not_in_their_way():
    done = subprocess.run([sys.executable, "-c", GEVENT_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The result comes back; other greenlets ran while it waited (unlike a plain call, which
    # lets nothing run: 0 ticks while it blocks).
    assert done.stdout.split() == ["42", "True", "7", "0"]


def test_without_gevent_a_save_runs_in_the_callers_thread():
    assert off_the_event_loop(lambda: threading.get_ident()) == threading.get_ident()
