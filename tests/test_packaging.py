"""The project installs as a Python project should: a wheel with the package, its data and three commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree, so that the build leaves nothing in it."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run(build, cwd=source, check=True, timeout=300)
    return next(out.glob("gpu_gateway-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (its dependencies come from this venv)."""
    target = tmp_path_factory.mktemp("site")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), wheel]
    subprocess.run(install, check=True, timeout=300)
    return target


def test_the_wheel_holds_the_package_its_templates_and_no_front_doors(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "gateway/api/templates/dashboard.html" in names
    assert "gateway/manager.py" in names and "resource_monitor/agent.py" in names
    assert not [name for name in names if "/" not in name], "top-level modules would shadow others' app or config"
    assert not [name for name in names if name.startswith("tests/")]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("gpu-gateway-client", "register"),
        ("gpu-monitor", "--register-to"),
        ("gpu-gateway", "gunicorn"),
    ],
)
def test_each_installed_command_runs_outside_the_checkout(installed, tmp_path, command, expected):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run(
        [str(installed / "bin" / command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


SERVE_DASHBOARD = """
import sys
import gateway.app
from gateway.config import Config
files = {"backend_servers_file": "s.json", "task_affinity_file": "t.db", "job_store_file": "j.db"}
config = Config.from_env({"WEBHOOK_SECRET": "x" * 24}, **files)
status = gateway.app.create_app(config).test_client().get("/dashboard").status_code
print("RESULT", gateway.app.__file__, status, file=sys.stderr)
"""


def test_the_installed_gateway_serves_its_dashboard_page(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run(
        [sys.executable, "-c", SERVE_DASHBOARD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    _, where, status = next(line for line in result.stderr.splitlines() if line.startswith("RESULT ")).split()
    assert where.startswith(str(installed))
    assert status == "200"
