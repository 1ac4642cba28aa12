"""The seed's test client: `python test_b_client.py --help`. Installed, it is `gpu-gateway-client`.

The code is in `gateway/cli.py`. It needs the gateway's requirements: run it with the
virtualenv's python (`.venv/bin/python test_b_client.py`, after `make run` made `.venv`).
"""

import sys

try:
    from gateway.cli import cli
except ModuleNotFoundError as exc:  # a python without the gateway's requirements (click, requests)
    sys.exit(
        f"test_b_client.py: {exc} in {sys.executable}. Run it with the gateway's virtualenv: "
        ".venv/bin/python test_b_client.py (make run sets .venv up), or pip install . and run gpu-gateway-client"
    )

if __name__ == "__main__":
    cli()
