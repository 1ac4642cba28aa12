"""What the CLI's tests share: the CLI run as a user runs it, with the secrets no output may show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import SECRET

ROOT = Path(__file__).resolve().parent.parent
WRONG_SECRET = "not-the-secret-93b1d7"
ADMIN = "admin-token-61c0f9e2d87a"


def run_cli(*args: str, secret: str | None = SECRET, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a subprocess; `secret` goes on the command line. No secret may reach its output."""
    clean_env = {
        k: v for k, v in os.environ.items() if k not in ("WEBHOOK_SECRET", "GATEWAY_URL", "ADMIN_TOKEN", "SERVER_TOKEN")
    }
    command = [sys.executable, "test_b_client.py", *args]
    if secret is not None:
        command += ["--secret", secret]
    result = subprocess.run(command, cwd=ROOT, env={**clean_env, **env}, capture_output=True, text=True, timeout=30)
    for value in (SECRET, WRONG_SECRET, ADMIN):
        assert value not in result.stdout + result.stderr
    return result


def admin_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the admin token on the command line (and the webhook secret, which it must not use)."""
    return run_cli(*args, "--admin-token", ADMIN, **env)
