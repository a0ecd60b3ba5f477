"""Runs several methods of one config file side by side and writes a results table.

  python launch/compare.py --config configs/banking77.py:cpu --out results/b77
  python launch/compare.py --config configs/banking77.py:cpu --config.server.rounds=3 \
      --methods hetlora,flexlora --alphas 0.1 --out /tmp/b77

runs every method (HetLoRA, zero-padding, HomLoRA at the smallest and the
largest rank, HeLoRA-Pad, FlexLoRA, FLoRA, FFA-LoRA, HeLoRA-KD) at Dirichlet
0.5 and 0.1; ``--methods`` and ``--alphas`` pick a subset. Ablations: each
``--variant`` runs every method again with some fields changed::

  python launch/compare.py --config configs/mnist_vit.py:cpu --methods hetlora --alphas 0.5 \
      --variant "no-pruning: method.kwargs.prune=False" --variant "gamma0.9: method.kwargs.gamma=0.9" \
      --out /tmp/ablation

``--seeds 0,1,2`` repeats every run per seed (``config.seed``: the data split,
the ranks, the cohorts, the initial adapter and any subsample of the data) and adds a mean +- std table.

Flags: ``--config`` (a config file, optionally ``:arg`` such as ``:cpu`` or
``:runlocal``), any ``--config.<field>=<value>`` override, ``--methods``,
``--alphas``, ``--variant``, ``--seeds``, ``--out``, ``--dry_run``. For each alpha and method the config
file's ``get_config`` runs again with ``method=<m>,alpha=<a>`` added to
``arg``, then the ``--config.<field>`` overrides are applied on top.

Every run shares the config's clients, ranks and budget (and, without
``--seeds``, its seed); only ``method``, ``alpha`` and a variant's fields change. Writes ``results.md``, ``results.json``
and ``accuracy.png`` under ``--out``; finished runs are resumed, not redone.
``results.json`` records this command line, the date (UTC) and the machine.
With ``--out`` under ``benchmarks/results/`` the results page
(``docs/results.md``) is rebuilt afterwards (``benchmarks/results_page.py``).
"""

import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hetlora import compare, parallel  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "configs" / "banking77.py"),
    "Config file with get_config(arg), optionally 'file.py:arg'; --config.<field>=<value> overrides a field "
    "of every run.", lock_config=True)
_METHODS = flags.DEFINE_list(
    "methods", ["hetlora", "zero_pad", "homlora_min", "homlora_max", "helora_pad", "flexlora", "flora",
                "ffa_lora", "helora_kd"], "Methods (the config's method= names).")
_ALPHAS = flags.DEFINE_list("alphas", ["0.5", "0.1"], "Dirichlet alphas (the config's alpha=).")
_OUT = flags.DEFINE_string("out", "results/compare", "Output directory.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the runs' configs as JSON and train nothing.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "An ablation, 'name: field=value ...' (repeatable): every method then runs once per "
    "variant with those fields set, named <method>_<name>_alpha<a>.")
_SEEDS = flags.DEFINE_list(
    "seeds", [], "Seeds (config.seed): every run then repeats once per seed, named <run>_seed<s>, and "
    "results.md adds a mean +- std table over them. Empty: the config's own seed, no suffix.")


def parse_seeds(values: list[str]) -> list[int] | None:
  """``--seeds`` as integers (``None`` when empty); a named error for anything else."""
  try:
    return [int(v) for v in values] or None
  except ValueError:
    raise app.UsageError(f"--seeds={','.join(values)} must be integers, e.g. --seeds 0,1,2.") from None


def provenance() -> dict:
  """This run's command line (from the repository root), UTC date and machine, for results.json."""
  import jax
  script = Path(sys.argv[0]).resolve()
  try:
    script = script.relative_to(REPO)
  except ValueError:
    pass
  return {
      "command": shlex.join(["python", script.as_posix(), *sys.argv[1:]]),
      "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
      "machine": {"platform": platform.platform(), "cpu": compare.cpu_model(), "cpu_count": os.cpu_count(),
                  "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
                  "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
  }


def refresh_results_page(out: Path) -> None:
  """Rebuilds docs/results.md when ``out`` is under benchmarks/results/ (the page shows only those)."""
  results = REPO / "benchmarks" / "results"
  if not out.resolve().is_relative_to(results.resolve()):
    print(f"to show these results on docs/results.md, put {out} under {results} and run "
          "python benchmarks/results_page.py")
    return
  spec = importlib.util.spec_from_file_location("results_page", REPO / "benchmarks" / "results_page.py")
  module = sys.modules.setdefault("results_page", importlib.util.module_from_spec(spec))
  spec.loader.exec_module(module)
  module.refresh()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides are --config.<field>=<value>.")
  logging.set_verbosity(logging.WARNING)
  flag = flags.FLAGS[_CONFIG.name]
  variants = dict(map(compare.parse_variant, _VARIANTS.value)) or None
  configs = compare.method_configs(config_flags.get_config_filename(flag), _METHODS.value, _ALPHAS.value,
                                   config_flags.get_override_values(flag), variants,
                                   parse_seeds(_SEEDS.value))
  if _DRY_RUN.value:
    print(json.dumps({name: c.to_dict() for name, c in configs.items()}, indent=2, default=str))
    return
  parallel.maybe_initialize_distributed()
  rows = compare.compare(configs, _OUT.value, record=provenance())
  print(compare.markdown(rows))
  import jax
  if jax.process_index() == 0:
    refresh_results_page(Path(_OUT.value))


if __name__ == "__main__":
  app.run(main)
