"""The tests' network guard (tests/offline/network_guard.py): nothing a test does leaves this machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import network_guard
import pytest
from conftest import ROOT, free_port

from gateway.fleet.health import HealthChecker, Target

# Documentation addresses (RFC 5737, RFC 3849): were the guard to let one through, it would reach no one.
OFF_MACHINE_V4 = "192.0.2.1"
OFF_MACHINE_V6 = "2001:db8::1"


def test_a_connection_beyond_the_loopback_is_refused_and_recorded(network_guard_check):
    with pytest.raises(ConnectionRefusedError, match="network guard"):
        socket.create_connection((OFF_MACHINE_V4, 80), timeout=1)
    with socket.socket() as sock, pytest.raises(network_guard.OffMachineConnection):
        sock.connect_ex((OFF_MACHINE_V4, 443))  # raised, not returned: nothing was sent

    refused = network_guard_check.take()

    assert refused == [f"{OFF_MACHINE_V4}:80 (socket.connect)", f"{OFF_MACHINE_V4}:443 (socket.connect)"]
    assert network_guard_check.take() == []  # taken: this test passes


def test_ipv6_udp_and_ipv4_mapped_addresses_are_guarded_too(network_guard_check):
    if socket.has_ipv6:
        with (
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock,
            pytest.raises(network_guard.OffMachineConnection),
        ):
            sock.connect((OFF_MACHINE_V6, 80, 0, 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(network_guard.OffMachineConnection):
        sock.sendto(b"x", (OFF_MACHINE_V4, 53))
    assert len(network_guard_check.take()) == (2 if socket.has_ipv6 else 1)


def test_loopback_and_unix_sockets_pass(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=1):
            pass
        with socket.create_connection(("localhost", listener.getsockname()[1]), timeout=1):
            pass
    with socket.socket(socket.AF_INET) as sock:  # another address of 127.0.0.0/8: refused by the OS, not the guard
        assert sock.connect_ex(("127.0.0.3", free_port())) != 0
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    assert network_guard.is_loopback("::1")
    assert network_guard.is_loopback("::ffff:127.0.0.1")
    assert not network_guard.is_loopback("0.0.0.0")
    assert not network_guard.is_loopback("10.1.2.3")


def test_a_health_check_from_a_pool_thread_is_refused_without_leaving(network_guard_check):
    checker = HealthChecker(timeout=1.0)
    try:
        (result,) = checker.check_all([Target("B1", f"http://{OFF_MACHINE_V4}:8000")])
    finally:
        checker.close()
    assert not result.ok and "network guard" in result.detail
    assert network_guard_check.take() == [f"{OFF_MACHINE_V4}:8000 (socket.connect)"]


def test_a_connection_from_another_thread_fails_the_test_at_its_end(network_guard_check):
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            socket.create_connection((OFF_MACHINE_V4, 80), timeout=1)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    thread.join(5)
    assert isinstance(errors[0], network_guard.OffMachineConnection)
    assert network_guard_check.take() == [f"{OFF_MACHINE_V4}:80 (socket.connect)"]  # else the teardown fails it


CONNECT = f"""
import socket, sys
try:
    socket.create_connection(("{OFF_MACHINE_V4}", 80), timeout=1)
except ConnectionRefusedError as exc:
    print("refused:", type(exc).__name__)
"""


@pytest.mark.parametrize("gevent", [False, True], ids=["plain", "gevent"])
def test_a_process_the_tests_start_is_guarded_and_reports_it(network_guard_check, gevent):
    if gevent:
        pytest.importorskip("gevent")
    script = ("from gevent import monkey\nmonkey.patch_all()\n" if gevent else "") + CONNECT
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused: OffMachineConnection"
    (line,) = network_guard_check.take()
    assert line.endswith(f"{OFF_MACHINE_V4}:80 (socket.connect)")
