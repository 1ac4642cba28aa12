"""The seed's test client: `python test_b_client.py --help`. Installed, it is `gpu-gateway-client`.

The code is in `gateway/cli.py`.
"""

from gateway.cli import cli

if __name__ == "__main__":
    cli()
