#!/usr/bin/env bash
# Cloud TPU VM (single host or a pod slice): the same command on every worker.
# On a multi-host slice, hetlora.parallel.maybe_initialize_distributed() sees
# several hosts in TPU_WORKER_HOSTNAMES and calls jax.distributed.initialize(),
# which discovers the slice by itself.
#
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_vm.sh configs/banking77.py gs://bucket/hetlora/run1
#
# The repository must be checked out (and its venv installed) at the same
# path ($REPO, default ~/hetlora) on every worker; WORKDIR should be a GCS
# path or a shared file system.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [flags...]}
WORKDIR=${2:?usage: $0 CONFIG WORKDIR [flags...]}
shift 2
: "${TPU:?set TPU=<tpu-vm name>}"
: "${ZONE:?set ZONE=<zone>}"
REPO=${REPO:-'~/hetlora'}
EXTRA=$(printf ' %q' "$@")
CMD="cd $REPO && . .venv/bin/activate && python launch/train.py --config $CONFIG --workdir $WORKDIR$EXTRA"
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$CMD"
