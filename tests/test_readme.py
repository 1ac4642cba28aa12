"""The README and docs/ say what the gateway does: their samples, tables and commands, run for real.

The tour and `make run` run on a copy of the checkout, as a fresh clone has it, with its `.venv`
linked to this test's virtualenv and `make -o .venv/bin/.runtime`, so that nothing is installed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ROOT, SECRET, free_port, wait_until

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_INSTALL = ["make", "-o", ".venv/bin/.runtime"]  # the prerequisite that would pip install, taken as made


def section(path: Path, heading: str) -> str:
    """The text under one `## heading`, to the next heading of that level."""
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -- what the pages say -----------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_every_comment_that_closes_was_opened(path):
    """A stray `-->` renders as text, and a stray `<!--` hides the rest of the page."""
    text = path.read_text()
    marks = re.findall(r"<!--|-->", text)
    assert marks == ["<!--", "-->"] * (len(marks) // 2)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_a_link_that_says_above_or_below_points_that_way(path):
    lines = path.read_text().splitlines()
    headings = {slug(line.lstrip("#")): number for number, line in enumerate(lines) if line.startswith("#")}
    for number, line in enumerate(lines):
        for word, anchor in re.findall(r"\[(above|below)\]\(#([\w-]+)\)", line):
            assert anchor in headings, f"{path.name}:{number + 1} links to a heading that is not there: #{anchor}"
            assert (headings[anchor] < number) == (word == "above"), (
                f"{path.name}:{number + 1}: {word} points the other way"
            )


def test_the_bench_time_is_the_same_everywhere_and_near_the_last_run():
    makefile = re.search(r"^bench:.*\(about (\d+) minutes\)", (ROOT / "Makefile").read_text(), flags=re.M)
    development = re.search(r"^make bench .*\(about (\d+) minutes\)", (ROOT / "docs/development.md").read_text(), re.M)
    assert makefile and development
    assert makefile.group(1) == development.group(1)
    meta = json.loads((ROOT / "bench/results.json").read_text())["meta"]
    if not meta["quick"]:
        assert abs(int(makefile.group(1)) * 60 - meta["suite_wall_s"]) <= 60


def documented_register_replies() -> list[tuple[str, str]]:
    """Each `# {...}` sample of a reply to /webhook/register, with the page it is on."""
    samples = []
    for path in (ROOT / "README.md", ROOT / "docs/servers.md"):
        for line in path.read_text().splitlines():
            sample = line.strip().removeprefix("# ")
            if sample.startswith('{"success"') and re.search(r'"server \w+ registered"', sample):
                samples.append((path.name, sample))
    return samples


@pytest.mark.parametrize(("page", "sample"), documented_register_replies())
def test_a_documented_register_reply_has_a_real_replys_fields(make_app, page, sample):
    """A sample with `...` leaves fields out but keeps the order; one without it has them all."""
    binding = "token" if '"server_token"' in sample else "off"
    client = make_app(registration_binding=binding).test_client()
    body = {"server_id": "B1", "ip": "127.0.0.1", "port": free_port(), "secret": SECRET}
    real = list(client.post("/webhook/register", json=body).get_json())
    elided = re.sub(r",\s*\.\.\.(?=\s*[,}])", "", sample)
    documented = list(json.JSONDecoder().raw_decode(elided)[0])  # what follows the JSON is a remark
    if elided == sample:
        assert documented == real
    else:
        assert documented == [key for key in real if key in documented]


def test_the_metrics_table_lists_every_metric_and_only_those(client):
    table = section(ROOT / "docs/observability.md", "Metrics and status")
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([a-z_*]+)`", row)}
    exposition = client.get("/metrics").get_data(as_text=True)
    exposed = set(re.findall(r"^# TYPE (\w+) ", exposition, flags=re.M))
    exposed = {name for name in exposed if not name.endswith("_created")}  # the exposition's timestamps of counters
    undocumented = {name for name in exposed if not any(fnmatch.fnmatch(name, pattern) for pattern in documented)}
    assert not undocumented
    assert {name for name in documented if "*" not in name} <= exposed


# -- what the commands do ---------------------------------------------------------------------


def test_the_client_run_by_a_python_without_click_names_the_python_to_use():
    """`python -S` leaves site-packages out, as a system python without the requirements would."""
    result = subprocess.run(
        [sys.executable, "-S", "test_b_client.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "No module named" in result.stderr and ".venv/bin/python test_b_client.py" in result.stderr
    assert "gpu-gateway-client" in result.stderr and "Traceback" not in result.stderr


def test_without_root_the_browser_test_says_what_to_install(monkeypatch):
    spec = importlib.util.spec_from_file_location("dashboard_tests", ROOT / "tests/api/test_dashboard.py")
    assert spec and spec.loader
    dashboard_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dashboard_tests)
    monkeypatch.setattr(dashboard_tests.shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(dashboard_tests.subprocess, "run", lambda *args, **kwargs: pytest.fail("ran apt-get"))
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium chromium-driver"):
        dashboard_tests.chromedriver.__wrapped__()


# -- on a fresh copy ---------------------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The files git tracks (or would), copied from the working tree as a fresh clone has them."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    )
    pack = ["tar", "-c", "--null", "--ignore-failed-read", "-T", "-"]  # a file deleted but not committed is skipped
    archive = subprocess.run(pack, input=listed.stdout, cwd=ROOT, capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive.stdout, check=True, timeout=60)
    (copy / ".venv").symlink_to(sys.prefix)
    return copy


@pytest.fixture
def newcomer_env(tmp_path: Path) -> dict[str, str]:
    """A shell with none of this machine's settings, and a free port for the gateway."""
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "GATEWAY_BIND": f"127.0.0.1:{free_port()}"}


def refuses(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@contextlib.contextmanager
def make_run(checkout: Path, env: dict[str, str], *variables: str) -> Iterator[str]:
    """`make run` in the checkout until the block ends; yields what it printed so far, once it answers."""
    log_path = checkout / f"make-run-{len(list(checkout.glob('make-run-*')))}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*NO_INSTALL, "run", *variables], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://{env['GATEWAY_BIND']}/health"
        assert wait_until(lambda: process.poll() is not None or not refuses(env["GATEWAY_BIND"]), timeout=30)
        assert process.poll() is None, log_path.read_text()
        assert requests.get(url, timeout=5).status_code == 200
        yield log_path.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # make and the gunicorn it started, by the PID we started
        process.wait(timeout=30)
        assert wait_until(lambda: refuses(env["GATEWAY_BIND"]), timeout=30)


def run_in_a_second_terminal(checkout: Path, env: dict[str, str], script: str, name: str) -> tuple[int, str]:
    """`script` in bash beside `make run`, as a user's second terminal; its exit status and what it printed."""
    output_path = checkout.parent / name  # a file, not a pipe: a fake server left running holds it open
    with make_run(checkout, env), open(output_path, "wb") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script], cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            shell.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGTERM)  # the shell and the fake servers it left in the background
            shell.wait(timeout=30)
    return shell.returncode, output_path.read_text()


@pytest.mark.slow
def test_the_readme_tour_runs_on_a_fresh_copy(checkout, newcomer_env):
    """`make run` in one terminal; every block after it, in order, in a second one."""
    blocks = shell_blocks(section(checkout / "README.md", "A five-minute tour"))
    blocks += shell_blocks(section(checkout / "README.md", "A GPU that sleeps"))  # after the tour, as a user goes on
    blocks += shell_blocks(section(checkout / "README.md", "Where each request fits"))
    assert blocks[0].strip().startswith("make run")
    fake_port, sleeper_port = free_port(), free_port()
    script = "set -euo pipefail\n" + "\n".join(blocks[1:]).replace("9001", str(fake_port))
    script = script.replace("9002", str(sleeper_port))
    code, output = run_in_a_second_terminal(checkout, newcomer_env, script, "tour.out")
    assert code == 0, output
    assert '"message":"server B4 registered"' in output
    assert re.search(r"^B4 .* healthy", output, flags=re.M), output  # the client's list
    assert "X-Backend-Server: B4" in output and '"status": "completed"' in output
    # A GPU that sleeps: the job waited with no server up, and ran on the one that came.
    assert (
        '"status":"queued","position":1,"estimated_wait_seconds":null' in output and "no GPU server is online" in output
    ), output
    assert '"server_id": "B5"' in output and '"task_id"' in output, output
    # Where each request fits: a key pinned to B5 and routed there; a model's need declared on it.
    pinned = output.split('"message":"key user-42 allocated to B5"', 1)
    assert len(pinned) == 2, output
    assert "X-Backend-Server: B5" in pinned[1] and '"type":"initial","server_id":"B5"' in pinned[1], output
    assert '"message":"rebalance would move 0 keys"' in output and '"dry_run":true' in output, output
    assert "{'qwen3:14b': 24} []" in output and '"stale_after_s":' in output, output
    assert wait_until(lambda: refuses(f"127.0.0.1:{fake_port}"))
    assert wait_until(lambda: refuses(f"127.0.0.1:{sleeper_port}"))


@pytest.mark.slow
def test_make_run_admin_1_gives_the_gateway_a_token_that_later_runs_keep(checkout, newcomer_env):
    admin_servers = f"http://{newcomer_env['GATEWAY_BIND']}/admin/servers"
    with make_run(checkout, newcomer_env, "ADMIN=1") as printed:
        assert "Generated an admin token (kept in .admin_token)" in printed
        token = (checkout / ".admin_token").read_text().strip()
        secret = (checkout / ".webhook_secret").read_text().strip()
        assert stat.S_IMODE((checkout / ".admin_token").stat().st_mode) == 0o600
        assert requests.get(admin_servers, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
        assert requests.get(admin_servers, headers={"X-Webhook-Secret": secret}, timeout=5).status_code == 401
    with make_run(checkout, newcomer_env) as printed:
        assert "Generated" not in printed and "Using the admin token in .admin_token" in printed
        assert requests.get(admin_servers, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
    assert (
        "admin_token"
        in subprocess.run(["git", "check-ignore", ".admin_token"], cwd=ROOT, capture_output=True, text=True).stdout
    )


@pytest.mark.slow
def test_the_llm_page_runs_without_a_gpu_on_a_fresh_copy(checkout, newcomer_env):
    """docs/llm.md's "Try it without a GPU": `make run` in one terminal, the other blocks in a second."""
    text = (checkout / "docs/llm.md").read_text()
    blocks = shell_blocks(text[text.index("**Try it without a GPU**") : text.index("How it behaves:")])
    assert blocks[0].strip().startswith("make run")
    script = "set -euo pipefail\n" + "\n".join(blocks[1:])
    for port in ("11501", "11502", "11503"):
        script = script.replace(port, str(free_port()))
    code, output = run_in_a_second_terminal(checkout, newcomer_env, script, "llm.out")
    assert code == 0, output
    assert '"server":"B2"' in output.replace(" ", "")  # /api/ps names the boxes
    assert "[B2 qwen2:7b 0]" in output and "[B3 llama3.1:8b-instruct-q4_K_M 0]" in output, output
    assert "data: [DONE]" in output and '"embeddings"' in output, output
    assert output.count("model_not_found") >= 2, output  # whisper-1 and gpt-4o under /v1/


@pytest.mark.slow
def test_more_than_one_process_or_host_runs_on_a_fresh_copy(checkout, newcomer_env):
    """Redis and the migration, gateway A (two workers) in one terminal, B in another, the checks in a third."""
    redis_block, first, second, checks = shell_blocks(section(checkout / "README.md", "More than one process or host"))
    redis_port, a_port, b_port, fake_port = (str(free_port()) for _ in range(4))

    def ported(text: str) -> str:
        for old, new in (("6380", redis_port), (":5001", f":{b_port}"), (":5000", f":{a_port}"), ("9003", fake_port)):
            text = text.replace(old, new)
        return text

    def gateway_env(line: str) -> dict[str, str]:
        *assignments, make, target = shlex.split(ported(line.strip()))
        assert (make, target) == ("make", "run")
        return {**newcomer_env, "GATEWAY_BIND": f"127.0.0.1:{a_port}", **dict(a.split("=", 1) for a in assignments)}

    started = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + ported(redis_block)], cwd=checkout, env=newcomer_env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    redis_pid = int((checkout / ".redis/redis.pid").read_text())
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "servers: " in started.stdout and "jobs: " in started.stdout  # the migration said what it did
        with make_run(checkout, gateway_env(first)), make_run(checkout, gateway_env(second)):
            env = {**newcomer_env, "WEBHOOK_SECRET": (checkout / ".webhook_secret").read_text().strip()}
            output_path = checkout.parent / "scale-out.out"  # a file: the fake server left running holds it open
            with open(output_path, "wb") as out:
                shell = subprocess.Popen(
                    ["bash", "-c", "set -euo pipefail\n" + ported(checks)], cwd=checkout, env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            try:
                shell.wait(timeout=60)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(shell.pid, signal.SIGTERM)  # the shell and the fake server it left running
                shell.wait(timeout=30)
            output = output_path.read_text()
            assert shell.returncode == 0, output
            assert "X-Backend-Server: B6" in output
            assert "'store': 'redis'" in output and "'sweep_leader': '" in output, output
    finally:
        os.kill(redis_pid, signal.SIGTERM)
    assert wait_until(lambda: refuses(f"127.0.0.1:{fake_port}"))
