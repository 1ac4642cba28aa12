"""The machine the suite runs on: the tools it installs, what it records about the box, its limits."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateways import REPO
from nginx_services import nginx_binary, nginx_version
from wrk_load import wrk_version


def ensure_tools() -> dict[str, str]:
    """Install nginx and wrk with apt-get when missing; say what was installed."""
    missing = [package for package, binary in (("nginx", nginx_binary()), ("wrk", "wrk")) if not _found(binary)]
    if not missing:
        return {"installed": ""}
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*prefix, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    with _no_service_starts(prefix):
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(
                [*prefix, "apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False
            )
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=300, check=False)
    still = [package for package, binary in (("nginx", nginx_binary()), ("wrk", "wrk")) if not _found(binary)]
    if still:
        raise RuntimeError(
            f"could not install {', '.join(still)} with apt-get ({done.stderr.strip()[-300:]}); install them "
            "(wrk can also be built from its source, https://github.com/wg/wrk) and run again"
        )
    return {"installed": " ".join(missing)}


def _found(binary: str) -> bool:
    return shutil.which(binary) is not None or Path(binary).is_file()


@contextlib.contextmanager
def _no_service_starts(prefix: list[str]) -> Iterator[None]:
    """Keep apt from starting the system nginx on port 80 (a process this suite would not stop)."""
    policy = Path("/usr/sbin/policy-rc.d")
    made = False
    if not prefix and not policy.exists():
        policy.write_text("#!/bin/sh\n# written by bench/run_suite.py while it installs nginx\nexit 101\n")
        policy.chmod(0o755)
        made = True
    try:
        yield
    finally:
        if made:
            policy.unlink(missing_ok=True)


def machine_info() -> dict[str, Any]:
    """CPU, kernel, Python and tool versions, for results.json."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("gunicorn", "gunicorn_h1c", "gevent", "flask", "werkzeug", "urllib3", "requests"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu_model": cpu_model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "nginx": nginx_version(),
        "wrk": wrk_version(),
        **versions,
    }


def git_state() -> dict[str, Any]:
    """The commit the tree is at, and how many files differ from it."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD") or "unknown", "changed_files": len(changed)}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: others' work on the machine shows here."""
    return [round(value, 2) for value in os.getloadavg()]


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: thousands of streams, and the children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
