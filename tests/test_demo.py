"""`make demo` as a newcomer runs it: three simulated GPU servers register and rotate."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SECRET, free_port


def test_demo_shows_the_rotation_and_cleans_up(tmp_path):
    venv = Path(sys.executable).parent.parent
    env = {
        **os.environ,
        "VENV": str(venv),
        "DEMO_ONESHOT": "1",
        "DEMO_DIR": str(tmp_path),
        "GATEWAY_BIND": f"127.0.0.1:{free_port()}",
        "WEBHOOK_SECRET": SECRET,
    }
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    served = [line.rsplit(" ", 1)[-1] for line in result.stdout.splitlines() if "X-Backend-Server:" in line]
    assert served == ["B1", "B2", "B3", "B1", "B2", "B3"]
    ports = [int(env["GATEWAY_BIND"].rsplit(":", 1)[1])]
    for name in ("B1", "B2", "B3"):
        ports.append(int(re.search(r"127\.0\.0\.1:(\d+)", (tmp_path / f"{name}.log").read_text()).group(1)))
    for port in ports:  # everything the demo started has stopped
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
