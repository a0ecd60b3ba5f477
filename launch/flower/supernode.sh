#!/usr/bin/env bash
# One site of a hetlora federation: starts a SuperNode holding the site's clients (docs/flower.md).
#   bash launch/flower/supernode.sh <superlink-host:port> <client ids, e.g. 3 or 3,7> [model dir]
#   CERTS=/etc/hetlora/certs bash launch/flower/supernode.sh ...   # TLS: the SuperLink's ca.crt
#   AUTH_KEY=keys/site.key bash launch/flower/supernode.sh ...     # SuperNode authentication
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
exec flower-supernode "${SECURITY[@]}" --superlink "$SUPERLINK" --port "${PORT:-9094}" --node-config "$CONFIG"
