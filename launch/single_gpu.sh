#!/usr/bin/env bash
# One accelerator (or the CPU), one process.
#
#   launch/single_gpu.sh configs/banking77.py /tmp/hetlora/banking77 [extra flags...]
#
# The round runs as one jitted vmap over the cohort on device 0. If the cohort
# does not fit in device memory, set a chunk size (see docs/scaling.md).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [flags...]}
WORKDIR=${2:?usage: $0 CONFIG WORKDIR [flags...]}
shift 2
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
# Let XLA grow GPU memory instead of reserving 75% up front (friendlier on shared GPUs).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python launch/train.py --config "$CONFIG" --workdir "$WORKDIR" "$@"
