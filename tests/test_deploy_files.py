"""The two-host deploy files load: nginx -t takes the nginx file, redis-server runs with the Redis one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import redis
from conftest import ROOT, free_port
from redis_process import redis_server_binary

DEPLOY = ROOT / "deploy"
SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"


@pytest.fixture(scope="session")
def nginx_and_openssl() -> tuple[str, str]:
    """Debian's nginx and openssl, installed here with apt-get if missing and run as root (as CI is)."""
    if not (shutil.which("nginx", path=SBIN) and shutil.which("openssl")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("nginx -t needs nginx and openssl: sudo apt-get install nginx openssl", pytrace=False)
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "openssl"], check=True, timeout=900)
    nginx, openssl = shutil.which("nginx", path=SBIN), shutil.which("openssl")
    assert nginx and openssl, "nginx or openssl is missing even after apt-get install"
    return nginx, openssl


@pytest.mark.parametrize("name", ["nginx-gateway.conf", "nginx-two-hosts.conf"])
def test_nginx_accepts_the_shipped_file(tmp_path, name, nginx_and_openssl):
    nginx, openssl = nginx_and_openssl
    # A throwaway certificate and log folder stand in for /etc/letsencrypt and /var/log/nginx.
    cert, key, logs = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "logs"
    logs.mkdir()
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    site = (DEPLOY / name).read_text()
    site = site.replace("/etc/letsencrypt/live/gateway.example.com/fullchain.pem", str(cert))
    site = site.replace("/etc/letsencrypt/live/gateway.example.com/privkey.pem", str(key))
    site = site.replace("/var/log/nginx/", f"{logs}/")
    assert "/etc/letsencrypt" not in site and "/var/log" not in site
    (tmp_path / "site.conf").write_text(site)
    main = f"pid {tmp_path}/nginx.pid;\nerror_log {logs}/error.log;\nevents {{}}\n"
    (tmp_path / "nginx.conf").write_text(main + f"http {{ include {tmp_path}/site.conf; }}\n")
    checked = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(logs / "error.log")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_the_two_host_file_retries_only_what_was_never_sent():
    site = (DEPLOY / "nginx-two-hosts.conf").read_text()
    (retry,) = re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", site, re.M)
    assert retry.split() == ["error", "timeout"]  # never non_idempotent, never the gateway's own 5xx
    assert re.search(r"^\s*proxy_buffering off;", site, re.M)
    assert len(re.findall(r"^\s*server 10\.0\.0\.\d+:5000 max_fails=\d+", site, re.M)) == 2


def test_redis_server_runs_with_the_gateway_config(tmp_path):
    config = (DEPLOY / "redis-gateway.conf").read_text()
    # redis-server enters `dir` as it reads it, before a --dir on the command line replaces it:
    # the production folder need not exist here, so the copy leaves that one line out.
    assert len(re.findall(r"^dir ", config, re.M)) == 1
    (tmp_path / "redis.conf").write_text(re.sub(r"^dir .*$", "", config, flags=re.M))
    data, port = tmp_path / "data", free_port()
    data.mkdir()
    args = [redis_server_binary(), str(tmp_path / "redis.conf"), "--port", str(port), "--dir", str(data),
            "--bind", "127.0.0.1"]  # fmt: skip
    with open(tmp_path / "redis.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, (tmp_path / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        settings = {name: client.config_get(name)[name] for name in ("appendonly", "appendfsync", "maxmemory-policy")}
        assert settings == {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
        assert client.config_get("no-appendfsync-on-rewrite")["no-appendfsync-on-rewrite"] == "no"
        assert client.set("gateway:check", "1")
        assert (data / "appendonlydir").is_dir()
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)  # by its PID
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_the_unit_stays_one_process_and_shows_the_cluster_settings():
    unit = (DEPLOY / "api-gateway.service").read_text()
    active = [line for line in unit.splitlines() if not line.startswith("#")]
    assert not any("REDIS_URL" in line or "GATEWAY_WORKERS" in line for line in active)
    assert "#Environment=REDIS_URL=" in unit and "#Environment=GATEWAY_WORKERS=" in unit
