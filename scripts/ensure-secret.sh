# Sourced by run-gateway.sh and demo.sh: make sure WEBHOOK_SECRET is set. Without one,
# generate it once into .webhook_secret (mode 600, ignored by git) and reuse it afterwards.
if [ -z "${WEBHOOK_SECRET:-}" ]; then
  if [ ! -s .webhook_secret ]; then
    (umask 077 && "$VENV"/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' > .webhook_secret)
    echo "Generated a webhook secret (kept in .webhook_secret): $(cat .webhook_secret)"
  fi
  WEBHOOK_SECRET="$(cat .webhook_secret)"
  echo "Using the webhook secret in .webhook_secret; GPU servers register with it."
fi
export WEBHOOK_SECRET
