#!/usr/bin/env bash
# One site of a hetlora federation: starts a SuperNode holding the site's clients (docs/flower.md).
#   bash launch/flower/supernode.sh <superlink-host:port> <client ids, e.g. 3 or 3,7> [model dir]
#   CERTS=/etc/hetlora/certs bash launch/flower/supernode.sh ...   # TLS: the SuperLink's ca.crt
#   AUTH_KEY=keys/site.key bash launch/flower/supernode.sh ...     # SuperNode authentication
#   SITE_WORKER=1 bash launch/flower/supernode.sh ...               # a site worker keeps the compiled training
# The site's data stays here: its clients train on their own partitions; only their rank slots travel.
set -euo pipefail
cd "$(dirname "$0")/../.."
SUPERLINK=${1:?superlink host:port}
CLIENTS=${2:?client ids, e.g. 0 or 0,5,10}
MODEL=${3:-}
STATE=${STATE:-$HOME/.cache/hetlora-site}
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$STATE/xla"
if [ -n "${CERTS:-}" ]; then SECURITY=(--root-certificates "$CERTS/ca.crt"); else SECURITY=(--insecure); fi
if [ -n "${AUTH_KEY:-}" ]; then SECURITY+=(--auth-supernode-private-key "$AUTH_KEY"); fi
CONFIG="client-ids='$CLIENTS' xla-cache='$STATE/xla'"
if [ -n "$MODEL" ]; then CONFIG="$CONFIG model-dir='$MODEL'"; fi
if [ -z "${SITE_WORKER:-}" ]; then
  exec flower-supernode "${SECURITY[@]}" --superlink "$SUPERLINK" --port "${PORT:-9094}" --node-config "$CONFIG"
fi
# The site worker (hetlora.flower.site_worker) serves a socket only this user can use; it stops with the SuperNode.
python -m hetlora.flower.site_worker --socket "$STATE/site.sock" > "$STATE/site_worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null' EXIT
while [ ! -S "$STATE/site.sock" ]; do
  kill -0 $WORKER 2>/dev/null || { echo "site worker failed: see $STATE/site_worker.log" >&2; exit 1; }
  sleep 0.5
done
flower-supernode "${SECURITY[@]}" --superlink "$SUPERLINK" --port "${PORT:-9094}" \
  --node-config "$CONFIG site-worker='$STATE/site.sock'"
