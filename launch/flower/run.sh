#!/usr/bin/env bash
# Submits the hetlora Flower App to a SuperLink (docs/flower.md).
#   bash launch/flower/run.sh <superlink-host:port> <config.py[:arg]> <workdir> [overrides] [min-nodes]
#   e.g. bash launch/flower/run.sh 127.0.0.1:9092 configs/tweets_hetlora.py "$PWD/workdirs/flower" "server.rounds=3" 5
# Without TLS the connection is insecure (localhost testing); with CERTS set it trusts $CERTS/ca.crt.
set -euo pipefail
cd "$(dirname "$0")/../.."
SUPERLINK=${1:?superlink host:port}; CONFIG=${2:?config}; WORKDIR=${3:?workdir}
OVERRIDES=${4:-}; MIN_NODES=${5:-1}
export PATH="$PWD/.venv/bin:$PATH"
export FLWR_HOME=${FLWR_HOME:-$HOME/.cache/hetlora-flwr}   # the CLI's connection file, not ~/.flwr
mkdir -p "$FLWR_HOME"
if [ -n "${CERTS:-}" ]; then SECURITY="root-certificates = \"$CERTS/ca.crt\""; else SECURITY="insecure = true"; fi
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "hetlora"

[superlink.hetlora]
address = "$SUPERLINK"
$SECURITY
TOML
cat > "$FLWR_HOME/hetlora_run.toml" <<TOML
config = "$CONFIG"
overrides = "$OVERRIDES"
workdir = "$WORKDIR"
min-nodes = $MIN_NODES
TOML
exec flwr run launch/flower hetlora --stream --run-config "$FLWR_HOME/hetlora_run.toml"
