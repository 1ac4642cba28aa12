# Sourced by run-gateway.sh and demo.sh, with the command to suggest as $1: stop with a hint
# when GATEWAY_BIND's port is taken, instead of leaving gunicorn to retry binding it.
export GATEWAY_BIND="${GATEWAY_BIND:-127.0.0.1:5000}"
"$VENV"/bin/python - "$GATEWAY_BIND" "$1" <<'PY' || exit 1
import errno, socket, sys
from gateway.config import ConfigError, parse_bind

try:
    host, port = parse_bind(sys.argv[1])
    family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
except ConfigError as exc:
    sys.exit(f"gateway: {exc}")
except OSError:
    sys.exit(0)  # a name that does not resolve: gunicorn says so
with socket.socket(family, kind) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
    try:
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            other = f"[{host}]" if ":" in host else host
            sys.exit(
                f"port {port} is in use (a gateway already running?); stop what listens there, or "
                f"set another address: GATEWAY_BIND={other}:{port + 1 if port < 65535 else 5001} {sys.argv[2]}"
            )
PY
