#!/usr/bin/env bash
# Start the gateway under gunicorn (deploy/gunicorn.conf.py), generating a secret if none is set.
set -euo pipefail
VENV="${VENV:-.venv}"
cd "$(dirname "$0")/.."
. scripts/ensure-port-free.sh "make run"
. scripts/ensure-secret.sh
echo "Gateway on http://$GATEWAY_BIND  (Ctrl-C stops it)"
exec "$VENV"/bin/gunicorn -c deploy/gunicorn.conf.py app:app
