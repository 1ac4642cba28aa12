"""gunicorn settings for the gateway: `gunicorn -c deploy/gunicorn.conf.py app:app`.

The settings are in `gateway/gunicorn_conf.py`, which the installed `gpu-gateway` command uses
too; this file is the path that a checkout, the systemd unit and the scripts name.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout that holds gateway/
from gateway.gunicorn_conf import *  # noqa: F403
