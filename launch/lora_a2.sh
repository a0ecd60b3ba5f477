#!/usr/bin/env bash
# The full LoRA-A2 setting on BANKING77 for the main methods, on one accelerator, one command.
#
#   launch/lora_a2.sh OUT [MODEL_DIR] [launch/compare.py flags...]
#
# The setting of Koo et al. (ACL 2025) as configs/banking77.py holds it: 30 clients all taking part,
# Dirichlet 0.5 and 0.1, ranks uniform over {1, 2, 4, 8, 16, 32}, 50 rounds of 5 local epochs,
# AdamW 5e-4, batch 16, LoRA on attention query/value, the classifier head a frozen random
# projection (head=frozen), compute in bfloat16. Methods: HetLoRA, zero-padding, HomLoRA at rank 1
# and 32, FFA-LoRA and FlexLoRA, each at both alphas (12 runs; finished runs are resumed, not redone).
#
# MODEL_DIR: a local Hugging Face BERT or RoBERTa directory (config.json, model.safetensors,
# tokenizer.json), e.g. roberta-base, the paper's model; empty or absent: all-MiniLM-L6-v2 (offline
# package). Later flags win, e.g. --methods hetlora,ffa_lora or --config.model.dtype=float32.
# LORA_A2_ARG adds to the config's argument; a CPU dry run at tiny sizes (2 rounds of 2 steps,
# 300 examples):
#
#   LORA_A2_ARG=runlocal launch/lora_a2.sh /tmp/lora_a2 "" --config.model.dtype=float32
#
# Writes OUT/results.{md,json}, OUT/accuracy.png and one workdir per run (launch/compare.py).
set -euo pipefail
OUT=${1:?usage: $0 OUT [MODEL_DIR] [compare flags...]}
MODEL=${2:-}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
ARG="head=frozen${LORA_A2_ARG:+,$LORA_A2_ARG}"
MODEL_FLAG=()
if [ -n "$MODEL" ]; then MODEL_FLAG=("--config.model.name=$MODEL"); fi
exec "${PYTHON:-python}" launch/compare.py --config "configs/banking77.py:$ARG" --alphas 0.5,0.1 \
  --methods hetlora,zero_pad,homlora_min,homlora_max,ffa_lora,flexlora --out "$OUT" \
  --config.model.dtype=bfloat16 "${MODEL_FLAG[@]}" "$@"
