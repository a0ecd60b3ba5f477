#!/usr/bin/env bash
# The server side of a hetlora federation on Flower: starts the SuperLink (docs/flower.md).
#   bash launch/flower/superlink.sh                 # localhost, no TLS (testing only)
#   CERTS=/etc/hetlora/certs bash launch/flower/superlink.sh   # TLS: ca.crt, server.pem, server.key
# Extra flags go to flower-superlink, e.g. --enable-supernode-auth (then register each site's
# public key: flwr supernode register site.pub <connection>).
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${PORT:-9092}
export PATH="$PWD/.venv/bin:$PATH"
if [ -n "${CERTS:-}" ]; then
  SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem" --ssl-keyfile "$CERTS/server.key")
else
  SECURITY=(--insecure)
fi
# The app's dependencies are installed already (pip install -e '.[flower]'): no `uv sync` at run time.
# DATABASE=<file> keeps the SuperLink's state (runs, nodes) across restarts; default: in memory.
exec flower-superlink "${SECURITY[@]}" --disable-runtime-dependency-installation --port "$PORT" \
  ${DATABASE:+--database "$DATABASE"} "$@"
