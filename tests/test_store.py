"""JsonFileStore: atomic saves, stale temp files, and corrupt files moved aside."""

import json

import pytest

from store import JsonFileStore, StoreError

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


@pytest.mark.parametrize("content", ["{not json", "", '{"server_id": "B1"}', "[1, 2]", '"text"'])
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


def test_unreadable_file_stops_the_start_even_as_root(tmp_path):
    path = tmp_path / "s.json"
    path.mkdir()  # a folder where the file should be: unreadable as a file for anyone
    with pytest.raises(StoreError):
        JsonFileStore(path).load()
    assert path.is_dir()
