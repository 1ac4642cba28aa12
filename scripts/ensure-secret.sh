# Sourced by run-gateway.sh and demo.sh: make sure WEBHOOK_SECRET is set. Without one,
# generate it once into .webhook_secret (mode 600, ignored by git) and reuse it afterwards.
# ADMIN_TOKEN likewise comes from .admin_token when that file exists; ADMIN=1 generates it.
new_secret() {
  (umask 077 && "$VENV"/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$1")
}
if [ -z "${WEBHOOK_SECRET:-}" ]; then
  if [ ! -s .webhook_secret ]; then
    new_secret .webhook_secret
    echo "Generated a webhook secret (kept in .webhook_secret): $(cat .webhook_secret)"
  fi
  WEBHOOK_SECRET="$(cat .webhook_secret)"
  echo "Using the webhook secret in .webhook_secret; GPU servers register with it."
fi
export WEBHOOK_SECRET
if [ -z "${ADMIN_TOKEN:-}" ]; then
  if [ ! -s .admin_token ] && [ "${ADMIN:-0}" = 1 ]; then
    new_secret .admin_token
    echo "Generated an admin token (kept in .admin_token): $(cat .admin_token)"
  fi
  if [ -s .admin_token ]; then
    ADMIN_TOKEN="$(cat .admin_token)"
    export ADMIN_TOKEN
    echo "Using the admin token in .admin_token; /admin/, /status and the dashboard take it, not the webhook secret."
  fi
fi
