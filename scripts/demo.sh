#!/usr/bin/env bash
# The gateway plus three simulated GPU servers that register themselves, then a look at the
# rotation. State goes to $DEMO_DIR (default .demo/), not to the real backend_servers.json.
# DEMO_ONESHOT=1 stops everything after the show instead of waiting for Ctrl-C.
set -euo pipefail
VENV="${VENV:-.venv}"
cd "$(dirname "$0")/.."
. scripts/ensure-port-free.sh "make demo"
. scripts/ensure-secret.sh
DEMO_DIR="${DEMO_DIR:-.demo}"
mkdir -p "$DEMO_DIR"
export BACKEND_SERVERS_FILE="$DEMO_DIR/backend_servers.json" TASK_AFFINITY_FILE="$DEMO_DIR/task_affinity.db" JOB_STORE_FILE="$DEMO_DIR/jobs.db" ALLOCATION_STORE_FILE="$DEMO_DIR/allocations.db"
export HEALTH_CHECK_INTERVAL="${HEALTH_CHECK_INTERVAL:-5}" HEALTH_CHECK_TIMEOUT="${HEALTH_CHECK_TIMEOUT:-2}"
GATEWAY="http://$GATEWAY_BIND"
rm -f "$BACKEND_SERVERS_FILE"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for N: wait until the gateway answers and lists N servers (and give up if it died)
wait_for() {
  "$VENV"/bin/python - "$GATEWAY" "$1" "$gateway_pid" "$DEMO_DIR" <<'PY'
import json, os, sys, time, urllib.request
gateway, wanted, pid, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
request = urllib.request.Request(gateway + "/webhook/servers", headers={"X-Webhook-Secret": os.environ["WEBHOOK_SECRET"]})
for _ in range(150):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the gateway stopped:\n" + open(os.path.join(folder, "gateway.log")).read()[-2000:])
    try:
        if json.load(urllib.request.urlopen(request, timeout=2))["data"]["total_servers"] == wanted:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"timed out waiting for the gateway to list {wanted} servers; see the logs in the demo folder")
PY
}

"$VENV"/bin/gunicorn -c deploy/gunicorn.conf.py app:app >"$DEMO_DIR/gateway.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
wait_for 0
count=0
for id in B1 B2 B3; do
  "$VENV"/bin/python demo/fake_gpu_server.py --server-id "$id" --register-to "$GATEWAY" >"$DEMO_DIR/$id.log" 2>&1 &
  pids+=($!)
  count=$((count + 1))
  wait_for "$count"
done
echo
echo "Three simulated GPU servers registered. Six requests through the gateway:"
"$VENV"/bin/python - "$GATEWAY" <<'PY'
import sys, urllib.request
for _ in range(6):
    with urllib.request.urlopen(sys.argv[1] + "/api/echo", timeout=5) as reply:
        print(f"  GET /api/echo -> X-Backend-Server: {reply.headers['X-Backend-Server']}")
PY
cat <<HELP

Try it yourself (another terminal):
  curl -si $GATEWAY/api/echo | grep X-Backend-Server
  export WEBHOOK_SECRET=\$(cat .webhook_secret)   # if you did not set your own
  .venv/bin/python test_b_client.py list --gateway $GATEWAY
HELP
if [ "${DEMO_ONESHOT:-0}" = 1 ]; then exit 0; fi
echo "Ctrl-C stops the gateway and the simulated servers."
wait
