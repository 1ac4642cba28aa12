"""Profile our gateway with py-spy while wrk loads it, and write a top-N summary for before/after comparisons.

Starts the nginx stand-ins and our gateway exactly as the suite does (gunicorn, deploy/gunicorn.conf.py,
3 servers), warms it up, then samples the gevent worker with `py-spy record --format raw --function`
for as long as wrk runs. Writes bench/profile-<label>.txt: the wrk figures under the profiler, the
functions with the most own time, the most inclusive time, and own time by file. py-spy pauses the
worker for each sample, so throughput under the profiler is lower than in `make bench`.

Run:  .venv/bin/python bench/profile_gateway.py --label before [--duration 10] [--connections 64]
          [--method GET|POST] [--rate 200] [--top 30] [--raw-out profile-before.folded]
Needs py-spy (bench/requirements.txt) and root, or ptrace rights over the gateway's worker.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateways import REPO, start_gateway
from machine import ensure_tools, git_state, raise_fd_limit
from nginx_services import GET_PATH, POST_PATH, start_stand_ins
from processes import HOST, descendants, free_port, interrupt_on_sigterm
from wrk_load import LoadResult, run_wrk

IDLE_WORKER = "Queue.get (gevent/_threading.py"  # a gevent threadpool thread waiting for work, not running
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
SITE_PACKAGES = re.compile(r".*/site-packages/")


@dataclass
class Profile:
    """Samples aggregated by function: own (leaf) and inclusive counts, and own counts by file."""

    samples: int = 0
    idle_samples: int = 0  # gevent threadpool threads blocked waiting for work, left out of the tables
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    own_by_file: Counter[str] = field(default_factory=Counter)
    inclusive_ours: Counter[str] = field(default_factory=Counter)  # frames in the gateway's own modules


def parse_folded(text: str) -> Profile:
    """Read py-spy's raw (folded) output: `frame;frame;...;leaf count` per line."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        if any(frame.startswith(IDLE_WORKER) for frame in frames):
            profile.idle_samples += count
            continue
        profile.samples += count
        profile.own[frames[-1]] += count
        profile.own_by_file[frame_file(frames[-1])] += count
        for frame in set(frames):  # a recursive function counts once per sample
            profile.inclusive[frame] += count
            if is_ours(frame):
                profile.inclusive_ours[frame] += count
    return profile


def short_frame(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py:12)`; repo paths relative."""
    found = FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = SITE_PACKAGES.sub("", found["file"]).removeprefix(str(REPO) + "/")
    line = f":{found['line']}" if found["line"] else ""
    return f"{found['function']} ({path}{line})"


def frame_file(frame: str) -> str:
    """The file part of a shortened frame."""
    found = FRAME.match(frame)
    return found["file"] if found else frame


def is_ours(frame: str) -> bool:
    """True for a frame in one of the gateway's modules (a .py file at the repository's top level)."""
    path = frame_file(frame)
    return "/" not in path and path.endswith(".py") and (REPO / path).is_file()


def summarise(profile: Profile, top: int) -> str:
    """The three top-N tables as plain text."""
    parts = []
    for title, counter in (
        ("own time (the function itself was running)", profile.own),
        ("inclusive time (the function was on the stack)", profile.inclusive),
        ("own time by file", profile.own_by_file),
        ("inclusive time, the gateway's own functions only", profile.inclusive_ours),
    ):
        parts.append(f"Top {top} by {title}:")
        parts.append(f"{'%':>6} {'samples':>8}  function")
        for name, count in counter.most_common(top):
            parts.append(f"{100 * count / max(profile.samples, 1):6.1f} {count:8d}  {name}")
        parts.append("")
    return "\n".join(parts)


def worker_pid(master_pid: int, timeout_s: float = 10.0) -> int:
    """The gunicorn worker under `master_pid` (the gateway runs exactly one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = descendants(master_pid)
        if children:
            return children[0]
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


def py_spy_binary() -> str:
    """py-spy from the venv, else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/python -m pip install -r bench/requirements.txt")
    return found


def profile_under_load(args: argparse.Namespace, folder: Path) -> tuple[Profile, LoadResult, str, str]:
    """Start the stand-ins and ours, load them with wrk while py-spy samples the worker."""
    with contextlib.ExitStack() as stack:
        _, ports = start_stand_ins(folder, stack)
        gateway = start_gateway(folder / "ours", free_port())
        stack.callback(gateway.stop)
        gateway.register_stand_ins(ports)
        url = gateway.url + (POST_PATH if args.method == "POST" else GET_PATH)
        run_wrk("ours", url, method=args.method, connections=args.connections, duration_s=2)  # warm-up
        worker = worker_pid(gateway.service.pid)
        raw_path = folder / "profile.folded"
        spy_argv = [py_spy_binary(), "record", "--pid", str(worker), "--rate", str(args.rate)]
        spy_argv += ["--duration", str(args.duration), "--format", "raw", "--function", "--output", str(raw_path)]
        with open(folder / "py-spy.log", "wb") as spy_log:
            spy = subprocess.Popen(spy_argv, stdout=spy_log, stderr=subprocess.STDOUT)
        try:
            time.sleep(0.5)  # py-spy attaches before the load starts
            load = run_wrk(
                "ours",
                url,
                method=args.method,
                connections=args.connections,
                duration_s=args.duration,
                server_cpu=gateway.service.cpu_seconds,
            )
            spy.wait(timeout=args.duration + 30)
        finally:
            if spy.poll() is None:
                spy.kill()  # by its PID, through the Popen that started it
                spy.wait()
        if spy.returncode != 0 or not raw_path.exists():
            log = (folder / "py-spy.log").read_text(errors="replace")
            raise RuntimeError(f"py-spy exited with {spy.returncode}: {log.strip()[-500:]}")
        folded = raw_path.read_text()
    return parse_folded(folded), load, folded, shlex.join(spy_argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--label", required=True, help="names the output: bench/profile-<label>.txt")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load and sampling (10)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--method", choices=("GET", "POST"), default="GET", help="GET, or POST with 1 KiB (GET)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (200)")
    parser.add_argument("--top", type=int, default=30, help="rows per table (30)")
    parser.add_argument("--raw-out", type=Path, help="also keep py-spy's folded stacks here (for flamegraph.pl)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.label):
        parser.error("--label may hold letters, digits, '.', '_' and '-' only")
    if not 1 <= args.duration <= 120 or not 1 <= args.connections <= 1000 or not 1 <= args.rate <= 1000:
        parser.error("need 1 <= --duration <= 120, 1 <= --connections <= 1000, 1 <= --rate <= 1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    raise_fd_limit()
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="gateway-profile-") as temp:
        profile, load, folded, spy_command = profile_under_load(args, Path(temp))
    if args.raw_out:
        args.raw_out.write_text(folded)
    out = REPO / "bench" / f"profile-{args.label}.txt"
    git = git_state()
    header = [
        f"profile {args.label}: our gateway's gevent worker under wrk, sampled by py-spy",
        f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"commit: {git['commit']} (+{git['changed_files']} changed files)",
        f"command: {shlex.join(sys.orig_argv)}",
        f"py-spy: {spy_command}",
        f"wrk: {args.method} {HOST} c={args.connections} for {args.duration}s under the profiler: "
        f"{load.requests_per_s:.0f} req/s, p50 {load.p50_ms:.2f} ms, p99 {load.p99_ms:.2f} ms, "
        f"CPU {load.cpu_us_per_request:.0f} µs/request, {load.errors} errors",
        f"samples: {profile.samples}; left out: the hub waiting in epoll (py-spy drops idle threads) and "
        f"{profile.idle_samples} samples of gevent threadpool threads waiting for work",
        "",
    ]
    out.write_text("\n".join(header) + summarise(profile, args.top))
    print(out.read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the gateway, the stand-ins and py-spy were stopped", file=sys.stderr)
        sys.exit(130)
