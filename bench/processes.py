"""The processes the suite starts: each in its own session, measured through /proc, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class ServiceFailed(RuntimeError):
    """A started process exited or never became ready; the message carries its log's tail."""


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so that the finally blocks stop what was started, as on Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, children first, read from /proc/<pid>/task/*/children."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        for children_file in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in children_file.read_text().split():
                    if int(child) not in found:
                        found.append(int(child))
                        queue.append(int(child))
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    return [pid, *descendants(pid)]


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds; gone ones count 0."""
    total_ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
        total_ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total_ticks / CLOCK_TICKS


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident set size summed over the given processes (shared pages count once per process)."""
    total_pages = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total_pages += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return total_pages * PAGE_BYTES


def open_fds(pid: int) -> int:
    """How many file descriptors a process holds; -1 when /proc will not say."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class Service:
    """One started process (with whatever it forks), its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        with open(log_path, "ab") as log_file:
            # A session of its own: a Ctrl-C in the terminal reaches the suite, which stops this in order.
            self.process = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The process id of the started process (gunicorn's or nginx's master)."""
        return self.process.pid

    def tree(self) -> list[int]:
        """The started process and its live descendants."""
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time of the whole tree so far."""
        return cpu_seconds(self.tree())

    def rss_bytes(self) -> int:
        """Resident memory of the whole tree."""
        return rss_bytes(self.tree())

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_running(self) -> None:
        """Raise ServiceFailed if the process has exited."""
        if self.process.poll() is not None:
            raise ServiceFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_for_port(self, port: int, timeout_s: float = 30.0) -> None:
        """Wait until something accepts connections on `port`; raise if the process dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_running()
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                return
            time.sleep(0.05)
        raise ServiceFailed(f"{self.name} did not listen on {HOST}:{port} within {timeout_s:g}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Signal the process by PID, wait, then SIGKILL it and any descendant still alive, by PID."""
        if self.process.poll() is not None:
            return
        family = descendants(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, self.stop_signal)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout_s)
        for pid in family:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
