"""Runs several methods of one config file side by side and writes a results table.

  python launch/compare.py --config configs/banking77.py --variant cpu --out results/b77

runs every method (HetLoRA, zero-padding, HomLoRA at the smallest and the
largest rank, HeLoRA-Pad, FlexLoRA, FLoRA, FFA-LoRA, HeLoRA-KD) at Dirichlet
0.5 and 0.1; ``--methods`` and ``--alphas`` pick a subset.

Every run shares the config's seed, clients, ranks and budget; only
``method`` (and ``alpha``) change. Writes ``results.md``, ``results.json``
and ``accuracy.png`` under ``--out``; finished runs are resumed, not redone.
"""

import importlib.util
import sys
from pathlib import Path

from absl import app, flags, logging

from hetlora import compare

_CONFIG = flags.DEFINE_string("config", "configs/banking77.py", "Config file with get_config(arg).")
_VARIANT = flags.DEFINE_string("variant", "", "Extra config arguments, e.g. 'cpu' or 'runlocal'.")
_METHODS = flags.DEFINE_list(
    "methods", ["hetlora", "zero_pad", "homlora_min", "homlora_max", "helora_pad", "flexlora", "flora",
                "ffa_lora", "helora_kd"], "Methods (the config's method= names).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.5", "0.1"], "Dirichlet alphas.")
_OUT = flags.DEFINE_string("out", "results/compare", "Output directory.")


def _load(path: str):
  sys.path.insert(0, str(Path(path).resolve().parent))
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  module = _load(_CONFIG.value)
  configs = {}
  for alpha in _ALPHAS.value:
    for method in _METHODS.value:
      arg = ",".join(filter(None, [f"method={method}", f"alpha={alpha}", _VARIANT.value]))
      configs[f"{method}_alpha{alpha}"] = module.get_config(arg)
  rows = compare.compare(configs, _OUT.value)
  print(compare.markdown(rows))


if __name__ == "__main__":
  app.run(main)
