#!/usr/bin/env bash
# Several GPUs on one host, one process: JAX sees every local GPU, and the
# `clients` mesh axis (hetlora.parallel.client_mesh) spans them, so each GPU
# trains K / n_gpus clients of every round.
#
#   launch/multi_gpu.sh configs/banking77.py /tmp/hetlora/banking77 [extra flags...]
#   GPUS=0,1,2,3 launch/multi_gpu.sh ...          # a subset
#
# One process per host is the simplest and fastest set-up; one process per
# GPU also works (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
# JAX_PROCESS_ID and JAX_LOCAL_DEVICE_IDS per process; see docs/scaling.md).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [flags...]}
WORKDIR=${2:?usage: $0 CONFIG WORKDIR [flags...]}
shift 2
cd "$(dirname "$0")/.."
if [[ -n "${GPUS:-}" ]]; then export CUDA_VISIBLE_DEVICES=$GPUS; fi
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python launch/train.py --config "$CONFIG" --workdir "$WORKDIR" "$@"
