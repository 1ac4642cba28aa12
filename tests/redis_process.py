"""A real redis-server for a test: on a free port, in a temp folder, stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MISSING = (
    "Redis mode's tests need redis-server on PATH; make test installs it only as root, with apt-get. "
    "Install it (Debian or Ubuntu: sudo apt-get install redis-server) and run make test again."
)


def redis_server_binary() -> str:
    """Debian's redis-server, installed here with apt-get if missing and run as root (as CI is)."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(MISSING)
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, timeout=900)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("redis-server is missing even after apt-get install redis-server")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """redis-server with an append-only file fsynced on every write, as deploy/redis-gateway.conf runs it."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProcess:
        """Start it (again, on the same port and data) and wait until it answers."""
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def kill(self) -> None:
        """SIGKILL it, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """Stop it by its PID and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
