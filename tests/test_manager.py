"""BackendManager: registration, persistence, thresholds, sweeps, and many threads at once."""

import contextlib
import json
import threading

import pytest

from gateway.fleet.health import HealthChecker, HealthResult
from gateway.fleet.records import FleetFull, Registrant, TokenRefused
from gateway.fleet.store import JsonFileStore
from gateway.manager import BackendManager, PersistError


def make_manager(tmp_path, **kwargs) -> BackendManager:
    manager = BackendManager(JsonFileStore(tmp_path / "servers.json"), **kwargs)
    manager.load()
    return manager


def fail(manager: BackendManager, server_id: str, times: int = 1) -> None:
    url = manager.get_server(server_id).url
    for _ in range(times):
        manager.apply_health_results([HealthResult(server_id, url, False, "refused")])


def pass_check(manager: BackendManager, server_id: str) -> None:
    url = manager.get_server(server_id).url
    manager.apply_health_results([HealthResult(server_id, url, True, "HTTP 200")])


def rotation(manager: BackendManager, count: int) -> list[str | None]:
    picks = [manager.get_next_server() for _ in range(count)]
    return [server.server_id if server else None for server in picks]


def stored(tmp_path) -> list[dict]:
    return json.loads((tmp_path / "servers.json").read_text())


def test_register_is_saved_before_it_returns(tmp_path):
    manager = make_manager(tmp_path)
    server, created = manager.register_server("B1", "192.168.1.100", 8000)
    assert created
    assert server.url == "http://192.168.1.100:8000"
    (entry,) = stored(tmp_path)
    assert entry.pop("health_changed_time") == server.health_changed_time is not None
    assert [entry] == [
        {
            "server_id": "B1",
            "ip": "192.168.1.100",
            "port": 8000,
            "url": "http://192.168.1.100:8000",
            "is_healthy": True,
            "fail_count": 0,
            "last_check_time": None,
            "last_used_time": None,
            "monitor_url": None,
            "last_error": None,
            "weight": 1,
            "priority": 1,
            "max_concurrent": 0,
            "models": [],
            "model_map": {},
            "labels": {},
            "max_allocations": 0,
            "draining": False,
            "discovered_models": [],
            "loaded_models": [],
            "model_memory_gb": {},
            "type": "gpu",
            "description": "",
            "skip_resource_check": False,
            "operator_options": [],
        }
    ]


def test_rotation_skips_unhealthy_and_takes_them_back(tmp_path):
    manager = make_manager(tmp_path)
    for name in ("B1", "B2", "B3"):
        manager.register_server(name, "127.0.0.1", 9000)
    assert rotation(manager, 4) == ["B1", "B2", "B3", "B1"]
    fail(manager, "B2", times=3)
    assert not manager.get_server("B2").is_healthy
    assert rotation(manager, 4) == ["B3", "B1", "B3", "B1"]
    url = manager.get_server("B2").url
    manager.apply_health_results([HealthResult("B2", url, True, "HTTP 200")])
    assert rotation(manager, 3) == ["B2", "B3", "B1"]


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_marked_unhealthy_exactly_at_the_threshold(tmp_path, threshold):
    manager = make_manager(tmp_path, failure_threshold=threshold)
    manager.register_server("B1", "127.0.0.1", 9000)
    pass_check(manager, "B1")  # the threshold counts from a server's first success
    fail(manager, "B1", times=threshold - 1)
    assert manager.get_server("B1").is_healthy
    assert manager.get_server("B1").fail_count == threshold - 1
    fail(manager, "B1")
    assert not manager.get_server("B1").is_healthy
    assert manager.get_next_server() is None


def test_a_server_that_never_passed_is_marked_unhealthy_by_its_first_failure(tmp_path, caplog):
    manager = make_manager(tmp_path, failure_threshold=3)
    manager.register_server("B1", "127.0.0.1", 9000)
    manager.register_server("B2", "127.0.0.1", 9001)
    pass_check(manager, "B2")

    fail(manager, "B1")  # new, never checked: out at its first failed check, as HAProxy starts a server
    fail(manager, "B2")  # passed once: one failure of three

    assert (manager.get_server("B1").is_healthy, manager.get_server("B1").fail_count) == (False, 1)
    assert (manager.get_server("B2").is_healthy, manager.get_server("B2").fail_count) == (True, 1)
    assert rotation(manager, 2) == ["B2", "B2"]
    assert "server B1 marked unhealthy by its first failed check (it never passed one)" in caplog.text
    assert stored(tmp_path)[0]["is_healthy"] is False  # a change of health is saved at once
    fail(manager, "B2", times=2)
    assert not manager.get_server("B2").is_healthy
    assert "server B2 marked unhealthy after 3 failures" in caplog.text


def test_the_threshold_counts_from_the_first_success(tmp_path):
    manager = make_manager(tmp_path, failure_threshold=3)
    manager.register_server("B1", "127.0.0.1", 9000)
    fail(manager, "B1")
    assert not manager.get_server("B1").is_healthy
    pass_check(manager, "B1")  # its first success: now it takes three failures in a row
    fail(manager, "B1", times=2)
    assert manager.get_server("B1").is_healthy
    manager.register_server("B1", "127.0.0.1", 9000)  # a heartbeat keeps what it has passed
    fail(manager, "B1")
    assert not manager.get_server("B1").is_healthy


def test_a_moved_server_starts_again_as_never_passed(tmp_path):
    manager = make_manager(tmp_path, failure_threshold=3)
    manager.register_server("B1", "127.0.0.1", 9000)
    pass_check(manager, "B1")
    manager.register_server("B1", "127.0.0.1", 9001)  # a new address: nothing is known of it yet
    assert manager.get_server("B1").last_check_time is None
    fail(manager, "B1")
    assert not manager.get_server("B1").is_healthy


def test_failed_proxied_requests_count_towards_the_threshold_only(tmp_path):
    manager = make_manager(tmp_path, failure_threshold=3)
    manager.register_server("B1", "127.0.0.1", 9000)  # never checked
    url = manager.get_server("B1").url
    for _ in range(2):
        manager.report_failure("B1", url, "connection refused")
    assert (manager.get_server("B1").is_healthy, manager.get_server("B1").fail_count) == (True, 2)
    assert manager.get_server("B1").last_check_time is None  # a proxied request is no check
    manager.report_failure("B1", url, "connection refused")
    assert not manager.get_server("B1").is_healthy


def test_a_success_resets_the_fail_count(tmp_path):
    manager = make_manager(tmp_path)
    manager.register_server("B1", "127.0.0.1", 9000)
    fail(manager, "B1", times=2)
    url = manager.get_server("B1").url
    manager.apply_health_results([HealthResult("B1", url, True, "HTTP 200")])
    fail(manager, "B1", times=2)
    assert manager.get_server("B1").is_healthy


def test_result_for_an_old_address_is_ignored(tmp_path):
    manager = make_manager(tmp_path, failure_threshold=1)
    manager.register_server("B1", "127.0.0.1", 9000)
    old_url = manager.get_server("B1").url
    manager.register_server("B1", "127.0.0.2", 9001)  # moved while a sweep was running
    manager.apply_health_results([HealthResult("B1", old_url, False, "refused")])
    assert manager.get_server("B1").is_healthy


def test_restart_restores_health_state_and_routes_at_once(tmp_path):
    manager = make_manager(tmp_path)
    for name in ("B1", "B2", "B3"):
        manager.register_server(name, "127.0.0.1", 9000)
        pass_check(manager, name)
    fail(manager, "B2", times=3)
    restarted = make_manager(tmp_path)
    assert [s.server_id for s in restarted.list_servers()] == ["B1", "B2", "B3"]
    assert not restarted.get_server("B2").is_healthy
    assert restarted.get_server("B2").fail_count == 3
    assert rotation(restarted, 3) == ["B1", "B3", "B1"]


def test_state_file_with_a_bad_entry_keeps_the_good_ones_and_a_copy(tmp_path, caplog):
    good = {"server_id": "B1", "ip": "127.0.0.1", "port": 9000}
    (tmp_path / "servers.json").write_text(json.dumps([good, {"server_id": "B2", "port": "x"}]))
    manager = make_manager(tmp_path)
    assert [s.server_id for s in manager.list_servers()] == ["B1"]
    copies = list(tmp_path.glob("servers.json.corrupt-*"))
    assert len(copies) == 1
    assert "B2" in copies[0].read_text()
    assert "bad entries" in caplog.text


GOOD_ENTRY = {"server_id": "B1", "ip": "127.0.0.1", "port": 9000}


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(5, id="a-number"),
        pytest.param("B2", id="a-string"),
        pytest.param(None, id="null"),
        pytest.param([{"server_id": "B2", "ip": "127.0.0.1", "port": 9001}], id="a-list"),
        pytest.param({"server_id": "B2", "ip": "169.254.169.254", "port": 80}, id="metadata-ip"),
        pytest.param({"server_id": "B2", "ip": "::ffff:169.254.169.254", "port": 80}, id="v4-mapped-metadata-ip"),
        pytest.param({"server_id": "B2", "ip": "fd00:ec2::254", "port": 80}, id="ipv6-metadata-ip"),
        pytest.param({"server_id": "B2", "ip": "0.0.0.0", "port": 80}, id="unspecified-ip"),
        pytest.param({"server_id": "B2", "ip": "224.0.0.1", "port": 80}, id="multicast-ip"),
        pytest.param({"server_id": "B2", "ip": "http://127.0.0.1", "port": 80}, id="url-as-ip"),
        pytest.param({"server_id": "B2", "ip": "", "port": 80}, id="empty-ip"),
        pytest.param({"server_id": "B2", "ip": "127.0.0.1", "port": 0}, id="port-0"),
        pytest.param({"server_id": "B2", "ip": "127.0.0.1", "port": 65536}, id="port-65536"),
        pytest.param({"server_id": "B2", "ip": "127.0.0.1", "port": True}, id="port-true"),
        pytest.param({"server_id": "B 2", "ip": "127.0.0.1", "port": 9001}, id="id-with-space"),
        pytest.param({"server_id": "../B2", "ip": "127.0.0.1", "port": 9001}, id="id-with-slash"),
        pytest.param({"server_id": "x" * 65, "ip": "127.0.0.1", "port": 9001}, id="id-too-long"),
        pytest.param({"server_id": "", "ip": "127.0.0.1", "port": 9001}, id="empty-id"),
        pytest.param(
            {"server_id": "B2", "ip": "127.0.0.1", "port": 9001, "monitor_url": "http://169.254.169.254"},
            id="metadata-monitor",
        ),
        pytest.param(
            {"server_id": "B2", "ip": "127.0.0.1", "port": 9001, "monitor_url": "file:///etc/passwd"},
            id="file-monitor",
        ),
        pytest.param(
            {"server_id": "B2", "ip": "127.0.0.1", "port": 9001, "monitor_url": "http://127.0.0.1:8006/api/pull"},
            id="monitor-with-a-path",
        ),
        pytest.param({"server_id": "B2", "ip": "168.63.129.16", "port": 80}, id="azure-wireserver"),
        pytest.param({"server_id": "B2", "ip": "127.0.0.1", "port": 9001, "labels": {"a": "\ud800"}}, id="surrogate"),
        pytest.param({"server_id": "B2", "ip": "127.0.0.1", "port": 9001, "models": ["\udfff"]}, id="surrogate-model"),
    ],
)
def test_a_state_file_entry_is_held_to_the_rules_of_a_registration(tmp_path, caplog, bad):
    # [{...good...}, 5] used to discard the whole fleet; an entry at 169.254.169.254 used to load.
    (tmp_path / "servers.json").write_text(json.dumps([GOOD_ENTRY, bad]))

    manager = make_manager(tmp_path)

    assert [s.server_id for s in manager.list_servers()] == ["B1"]
    (copy,) = tmp_path.glob("servers.json.corrupt-*")
    assert json.loads(copy.read_text()) == [GOOD_ENTRY, bad]
    assert "1 bad entries" in caplog.text
    manager.register_server("B3", "127.0.0.1", 9003)
    assert [entry["server_id"] for entry in stored(tmp_path)] == ["B1", "B3"]


def test_a_name_in_the_state_file_loads_without_a_lookup(tmp_path, monkeypatch):
    def no_resolver(*args):
        raise OSError("the resolver is down")

    monkeypatch.setattr("socket.getaddrinfo", no_resolver)
    entry = {"server_id": "B1", "ip": "gpu-1.example.internal", "port": 9000}
    (tmp_path / "servers.json").write_text(json.dumps([entry]))

    assert make_manager(tmp_path).get_server("B1").ip == "gpu-1.example.internal"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(bytes(range(128, 256)) * 8, id="random-bytes"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-100000-deep"),
        pytest.param(json.dumps([GOOD_ENTRY]).encode("utf-16"), id="utf-16"),
    ],
)
def test_a_damaged_state_file_is_moved_aside_and_the_fleet_starts_empty(tmp_path, content):
    (tmp_path / "servers.json").write_bytes(content)

    manager = make_manager(tmp_path)

    assert manager.list_servers() == []
    (aside,) = tmp_path.glob("servers.json.corrupt-*")
    assert aside.read_bytes() == content
    manager.register_server("B1", "127.0.0.1", 9000)
    assert [entry["server_id"] for entry in stored(tmp_path)] == ["B1"]


def test_unregister(tmp_path):
    manager = make_manager(tmp_path)
    manager.register_server("B1", "127.0.0.1", 9000)
    assert manager.unregister_server("B1")
    assert not manager.unregister_server("B1")
    assert stored(tmp_path) == []


def test_failed_save_raises_persist_error(tmp_path):
    manager = BackendManager(JsonFileStore(tmp_path / "missing-folder" / "servers.json"))
    with pytest.raises(PersistError, match="could not save"):
        manager.register_server("B1", "127.0.0.1", 9000)


def test_health_job_runs_only_while_servers_exist(tmp_path):
    manager = make_manager(tmp_path, health_checker=HealthChecker(timeout=0.5))
    try:
        assert not manager.health_check_running
        manager.register_server("B1", "127.0.0.1", 9000)
        assert manager.health_check_running
        manager.register_server("B2", "127.0.0.1", 9001)
        manager.unregister_server("B1")
        assert manager.health_check_running
        manager.unregister_server("B2")
        assert not manager.health_check_running
    finally:
        manager.shutdown()


def test_health_job_starts_after_a_restart_with_servers(tmp_path):
    make_manager(tmp_path).register_server("B1", "127.0.0.1", 9000)
    restarted = make_manager(tmp_path, health_checker=HealthChecker(timeout=0.5))
    try:
        assert restarted.health_check_running
    finally:
        restarted.shutdown()


def test_sweep_against_real_servers(tmp_path, fake_servers):
    up, sick, gone = fake_servers("UP"), fake_servers("SICK"), fake_servers("GONE")
    manager = make_manager(tmp_path, health_checker=HealthChecker(timeout=1.0), health_check_interval=3600)
    try:
        for server in (up, sick, gone):
            manager.register_server(server.server_id, "127.0.0.1", server.port)
        sick.healthy = False
        gone.stop()
        for _ in range(3):
            manager.run_health_sweep()
        health = {s.server_id: (s.is_healthy, s.fail_count) for s in manager.list_servers()}
        assert health == {"UP": (True, 0), "SICK": (False, 3), "GONE": (False, 3)}
        assert manager.get_server("UP").last_check_time is not None
        assert stored(tmp_path)[1]["is_healthy"] is False
        sick.healthy = True
        manager.run_health_sweep()
        assert manager.get_server("SICK").is_healthy
        assert manager.last_sweep["duration_s"] >= 0
    finally:
        manager.shutdown()


def test_sweep_does_not_follow_redirects(tmp_path, fake_servers):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    manager = make_manager(tmp_path, health_checker=HealthChecker(timeout=1.0), failure_threshold=1)
    try:
        manager.register_server("R", "127.0.0.1", server.server_address[1])
        manager.run_health_sweep()
        assert not manager.get_server("R").is_healthy
    finally:
        manager.shutdown()
        server.shutdown()
        server.server_close()


def test_50_threads_register_1000_servers_and_none_is_lost(tmp_path):
    manager = make_manager(tmp_path)
    errors: list[BaseException] = []

    def register(first: int) -> None:
        try:
            for i in range(first, first + 20):
                manager.register_server(f"S{i:04d}", "127.0.0.1", 10000 + i)
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(n * 20,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = {f"S{i:04d}" for i in range(1000)}
    assert {s.server_id for s in manager.list_servers()} == expected
    assert {entry["server_id"] for entry in stored(tmp_path)} == expected
    assert {s.server_id for s in make_manager(tmp_path).list_servers()} == expected


def test_rotation_stays_exact_under_concurrent_picks(tmp_path):
    manager = make_manager(tmp_path)
    for i in range(10):
        manager.register_server(f"B{i}", "127.0.0.1", 9000 + i)
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def pick() -> None:
        for _ in range(500):
            server_id = manager.get_next_server().server_id
            with lock:
                counts[server_id] = counts.get(server_id, 0) + 1

    threads = [threading.Thread(target=pick) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts == {f"B{i}": 400 for i in range(10)}


def test_get_next_server_hands_out_copies(tmp_path):
    manager = make_manager(tmp_path)
    manager.register_server("B1", "127.0.0.1", 9000)
    copy = manager.get_next_server()
    copy.is_healthy = False
    copy.ip = "10.0.0.1"
    assert manager.get_server("B1").is_healthy
    assert manager.get_server("B1").ip == "127.0.0.1"
    assert manager.get_server("B1").last_used_time is not None


def test_a_change_that_could_not_be_saved_is_undone(tmp_path, monkeypatch):
    manager = make_manager(tmp_path)
    for name in ("B1", "B2", "B3"):
        manager.register_server(name, "127.0.0.1", 9000)

    def disk_full(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", disk_full)
    with pytest.raises(PersistError):
        manager.unregister_server("B2")
    with pytest.raises(PersistError):
        manager.register_server("B4", "127.0.0.1", 9004)
    with pytest.raises(PersistError):
        manager.register_server("B1", "127.0.0.9", 9999)
    assert [(s.server_id, s.ip) for s in manager.list_servers()] == [
        ("B1", "127.0.0.1"),
        ("B2", "127.0.0.1"),
        ("B3", "127.0.0.1"),
    ]
    assert rotation(manager, 3) == ["B1", "B2", "B3"]


def test_health_changes_are_applied_even_when_they_cannot_be_saved(tmp_path, monkeypatch):
    manager = make_manager(tmp_path, failure_threshold=1)
    manager.register_server("B1", "127.0.0.1", 9000)

    def disk_full(entries):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", disk_full)
    manager.report_failure("B1", manager.get_server("B1").url, "refused")  # must not raise
    assert not manager.get_server("B1").is_healthy
    assert manager.get_next_server() is None


def test_fail_counts_below_the_threshold_are_not_saved_at_once(tmp_path):
    manager = make_manager(tmp_path)
    manager.register_server("B1", "127.0.0.1", 9000)
    pass_check(manager, "B1")
    fail(manager, "B1", times=2)
    assert stored(tmp_path)[0]["fail_count"] == 0
    fail(manager, "B1")
    saved = stored(tmp_path)[0]
    assert (saved["is_healthy"], saved["fail_count"]) == (False, 3)


def test_undoing_an_unregister_keeps_servers_registered_meanwhile(tmp_path, monkeypatch):
    manager = make_manager(tmp_path)
    for name in ("X", "Y"):
        manager.register_server(name, "127.0.0.1", 9000)
    real_save = manager.store.save
    late = threading.Thread(target=manager.register_server, args=("Z", "127.0.0.1", 9003))

    def save_fails_while_z_registers(entries):
        monkeypatch.setattr(manager.store, "save", real_save)
        late.start()  # Z changes memory now, then waits for the save lock
        late.join(timeout=0.3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manager.store, "save", save_fails_while_z_registers)
    # Either X's removal is undone, or Z's later save already wrote it: both are consistent.
    with contextlib.suppress(PersistError):
        manager.unregister_server("X")
    late.join(timeout=10)
    in_memory = [s.server_id for s in manager.list_servers()]
    assert "Z" in in_memory
    assert [entry["server_id"] for entry in stored(tmp_path)] == in_memory


def test_the_time_of_the_last_health_change_is_kept(tmp_path):
    manager = make_manager(tmp_path)
    manager.register_server("B1", "127.0.0.1", 9000)
    registered_at = manager.get_server("B1").health_changed_time
    fail(manager, "B1", times=2)
    assert manager.get_server("B1").health_changed_time == registered_at  # still healthy: no change
    fail(manager, "B1")
    changed = manager.get_server("B1").health_changed_time
    assert changed is not None and changed >= registered_at
    assert make_manager(tmp_path).get_server("B1").health_changed_time == changed


def test_the_last_checks_error_is_kept_until_a_check_passes(tmp_path):
    manager = make_manager(tmp_path)
    manager.register_server("B1", "127.0.0.1", 9000)
    assert manager.get_server("B1").last_error is None
    fail(manager, "B1", times=3)
    assert manager.get_server("B1").last_error == "refused"
    assert make_manager(tmp_path).get_server("B1").last_error == "refused"  # why it is down outlives a restart
    manager.report_failure("B1", manager.get_server("B1").url, "Connection refused")
    assert manager.get_server("B1").last_error == "proxy: Connection refused"
    manager.apply_health_results([HealthResult("B1", manager.get_server("B1").url, True, "HTTP 200")])
    assert manager.get_server("B1").last_error is None
    assert manager.describe_server("B1")["last_error"] is None


def at_once(count: int, call) -> None:
    """Run call(0) ... call(count - 1) on threads of their own, released together, and wait for them."""
    start = threading.Barrier(count)

    def run(n: int) -> None:
        start.wait()
        call(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_max_servers_holds_under_50_threads_registering_at_once(tmp_path):
    manager = make_manager(tmp_path)
    limit, full = Registrant(max_servers=10), []

    def join(n: int) -> None:
        try:
            manager.register(f"B{n}", "127.0.0.1", 9000 + n, registrant=limit)
        except FleetFull as exc:
            full.append(exc.limit)

    at_once(50, join)

    assert len(manager.list_servers()) == 10
    assert full == [10] * 40
    assert len(stored(tmp_path)) == 10


def test_of_20_threads_claiming_one_id_at_once_exactly_one_gets_its_token(tmp_path):
    manager = make_manager(tmp_path)
    binding, tokens, refused = Registrant(binding=True), [], []

    def claim(n: int) -> None:
        try:
            tokens.append(manager.register("B1", "127.0.0.1", 9000 + n, registrant=binding).server_token)
        except TokenRefused as exc:
            refused.append(exc.missing)

    at_once(20, claim)

    (token,) = tokens
    assert refused == [True] * 19
    manager.register("B1", "127.0.0.1", 9100, registrant=binding._replace(server_token=token))
    assert stored(tmp_path)[0]["port"] == 9100


def test_a_bad_token_hash_in_the_state_file_is_a_bad_entry(tmp_path):
    entry = {**GOOD_ENTRY, "server_id": "B2", "token_hash": "plain-text-token"}
    (tmp_path / "servers.json").write_text(json.dumps([GOOD_ENTRY, entry]))

    assert [s.server_id for s in make_manager(tmp_path).list_servers()] == ["B1"]
