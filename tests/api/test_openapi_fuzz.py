"""schemathesis against a gateway run as deployed: no request gets a 5xx, and every reply matches /openapi.json.

`st run` fuzzes every operation of the gateway's own document, once with the credentials (the
webhook secret, which opens /admin while ADMIN_TOKEN is unset, and a dashboard login) and once
without. Every request goes to 127.0.0.1: the base URL is the gateway's, no redirect is
followed, fuzz_hooks.py keeps DNS names out of registrations, and ALLOWED_BACKEND_NETWORKS
holds the fleet to loopback.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import requests
from conftest import ROOT, SECRET

from gateway.proxy.forwarding import SESSION_COOKIE

pytestmark = pytest.mark.slow

HOOKS = ROOT / "tests/api/fuzz_hooks.py"
CONFIG = ROOT / "tests/api/schemathesis.toml"
MAX_EXAMPLES = 25  # per operation and phase
SECONDS = {"authenticated": 60, "unauthenticated": 30}  # each run's budget: fuzzing repeats until it is spent
LOOPBACK = "127.0.0.0/8,::1/128"


def credentials(url: str) -> list[str]:
    """Headers for every request: the webhook secret, and a dashboard login's session cookie."""
    login = requests.post(f"{url}/dashboard/login", data={"secret": SECRET}, allow_redirects=False, timeout=5)
    assert login.status_code == 303, login.text
    cookie = f"Cookie: {SESSION_COOKIE}={login.cookies[SESSION_COOKIE]}"
    return [
        "--header",
        f"X-Webhook-Secret: {SECRET}",
        "--header",
        cookie,
        "--generation-with-security-parameters",
        "false",
    ]


def fuzz(url: str, seconds: int, extra: list[str], report: str) -> subprocess.CompletedProcess[str]:
    """`st run` over the gateway's own document, bounded in examples and time."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", f"{url}/openapi.json"),
        *("--url", url, "--checks", "not_a_server_error,response_schema_conformance"),
        *("--max-examples", str(MAX_EXAMPLES), "--max-time", str(seconds), "--seed", "12", "--workers", "1"),
        *("--request-timeout", "10", "--max-redirects", "0", "--generation-database", "none"),
        *("--report", "junit", "--report-dir", report, "--no-color"),
        *extra,
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False
    )


def on_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


@pytest.mark.parametrize("run", sorted(SECONDS))
def test_schemathesis_finds_no_server_error_and_no_reply_off_the_spec(gateway_process, fake_servers, tmp_path, run):
    gateway = gateway_process(ALLOWED_BACKEND_NETWORKS=LOOPBACK)
    auth = {"X-Webhook-Secret": SECRET}
    for server in (fake_servers("B1"), fake_servers("B2")):
        body = {"server_id": server.server_id, "ip": "127.0.0.1", "port": server.port}
        requests.post(f"{gateway.url}/webhook/register", json=body, headers=auth, timeout=5).raise_for_status()

    extra = credentials(gateway.url) if run == "authenticated" else []
    result = fuzz(gateway.url, SECONDS[run], extra, str(tmp_path / "report"))

    output = result.stdout + result.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    assert result.returncode == 0, f"{output[-20000:]}\n--- gateway log ---\n{gateway.log()[-5000:]}"
    assert "Traceback" not in gateway.log()
    fleet = requests.get(f"{gateway.url}/webhook/servers", headers=auth, timeout=5).json()["data"]["servers"]
    for server in fleet:  # whatever the fuzzer registered, the gateway only ever calls this machine
        assert on_loopback(server["ip"]), server
        assert server["monitor_url"] is None or on_loopback(urlsplit(server["monitor_url"]).hostname), server
