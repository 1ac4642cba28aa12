#!/usr/bin/env bash
# Start the gateway under gunicorn (deploy/gunicorn.conf.py), generating a secret if none is set.
set -euo pipefail
VENV="${VENV:-.venv}"
cd "$(dirname "$0")/.."
. scripts/ensure-secret.sh
echo "Gateway on http://${GATEWAY_BIND:-127.0.0.1:5000}  (Ctrl-C stops it)"
exec "$VENV"/bin/gunicorn -c deploy/gunicorn.conf.py app:app
