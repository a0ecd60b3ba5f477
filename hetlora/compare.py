"""Running several methods on the same federation and tabulating the results.

``compare(configs, out_dir)`` runs :func:`hetlora.trainer.run` for each named
config (same seed, clients, ranks and budget, by construction of the
configs), then writes ``results.md`` (a Markdown table; for runs repeated over
seeds a second one of their mean +- std; for multiple-choice data one of per-task
accuracy, the base model first; for language models evaluated by generation
one of ROUGE-L and exact match on seen and unseen tasks; then clients per rank
by round for the runs whose ranks change), ``results.json``
and ``accuracy.png`` (test accuracy vs round, one line per run) to
``out_dir`` (process 0 only, on several hosts). Runs already finished in
``out_dir/<name>`` are resumed, not redone.

``method_configs('configs/banking77.py:cpu', methods, alphas, overrides)``
builds those configs from one config file: ``get_config`` with
``method=<m>,alpha=<a>`` added to the file's argument, then the
``--config.<field>=`` overrides on top; ``variants`` and ``seeds`` repeat every
run per ablation and per seed. :func:`cpu_model` names the processor for a
result's provenance: float results and speeds differ between processors.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from hetlora import trainer


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
  """The processor's model name (Linux: ``model name`` of ``cpuinfo``; elsewhere the platform's
  processor string), ``''`` when unknown."""
  try:
    for line in Path(cpuinfo).read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name" and value.strip():
        return value.strip()
  except OSError:
    pass
  return platform.processor()


def accuracy_at(accuracy_by_round: list[tuple[int, float]], fraction: float, rounds: int) -> float:
  """Test accuracy at the last evaluation no later than ``fraction * rounds`` (NaN if none)."""
  limit = fraction * rounds
  seen = [acc for r, acc in accuracy_by_round if r <= limit]
  return seen[-1] if seen else float("nan")


def row(name: str, summary: Mapping[str, Any]) -> dict[str, Any]:
  """A run's table row; ``by_task`` / ``zero_shot_by_task``: its last / round-0 per-task metrics
  (multiple-choice data; ``{}`` otherwise); ``generation`` / ``zero_shot_generation``: the same for
  a language model's evaluation by generation (ROUGE-L, exact match, answer loss)."""
  rounds = summary["rounds"]
  by_task = summary.get("by_task_by_round") or []
  generation = summary.get("generation_by_round") or []
  return {
      "run": name,
      "method": summary["method"],
      "final_accuracy": summary["final_test_accuracy"],
      "accuracy_at_25pct": accuracy_at(summary["accuracy_by_round"], 0.25, rounds),
      "accuracy_at_50pct": accuracy_at(summary["accuracy_by_round"], 0.5, rounds),
      "comm_params_per_round": summary["total_comm_params"] / max(rounds, 1),
      "mean_rank_start": float(np.mean(summary.get("initial_client_ranks", np.nan))),
      "mean_rank_end": float(np.mean(summary.get("final_client_ranks", np.nan))),
      "train_seconds": summary["train_seconds"],
      "eval_seconds": summary.get("eval_seconds", float("nan")),
      "rounds": rounds,
      "by_task": dict(by_task[-1][1]) if by_task else {},
      "zero_shot_by_task": dict(by_task[0][1]) if by_task and by_task[0][0] == 0 else {},
      "generation": dict(generation[-1][1]) if generation else {},
      "zero_shot_generation": dict(generation[0][1]) if generation and generation[0][0] == 0 else {},
  }


def markdown(rows: list[dict[str, Any]]) -> str:
  """One line per run; ``-`` for accuracies a run does not record (a language model's are in
  :func:`generation_markdown`)."""
  acc = lambda x: "-" if np.isnan(x) else f"{x:.4f}"
  head = ("| run | method | final acc | acc @25% | acc @50% | uploaded params / round | mean client rank, "
          "start -> end | train time (s) |\n|---|---|---|---|---|---|---|---|\n")
  body = "".join(
      f"| {r['run']} | {r['method']} | {acc(r['final_accuracy'])} | {acc(r['accuracy_at_25pct'])} | "
      f"{acc(r['accuracy_at_50pct'])} | {r['comm_params_per_round']:,.0f} | "
      f"{r['mean_rank_start']:.2f} -> {r['mean_rank_end']:.2f} | {r['train_seconds']:.0f} |\n"
      for r in rows)
  return head + body


def seed_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """The rows of runs that differ only in their seed (names ending ``_seed<s>``), by name without it."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    base, hit = re.subn(r"_seed\d+$", "", r["run"])
    if hit:
      groups.setdefault(base, []).append(r)
  return groups


def seed_markdown(rows: list[dict[str, Any]]) -> str:
  """Mean +- sample standard deviation over seeds of the final and mid-run accuracy and the train
  time, one line per group of :func:`seed_groups` (std ``-`` for a single seed)."""

  def stat(group, key, fmt):
    x = np.asarray([r[key] for r in group], np.float64)
    return f"{x.mean():{fmt}} +- {x.std(ddof=1):{fmt}}" if len(x) > 1 else f"{x.mean():{fmt}} +- -"

  head = ("| runs | method | seeds | final acc | acc @50% | train time (s) |\n"
          "|---|---|---|---|---|---|\n")
  return head + "".join(
      f"| {base}_seed* | {g[0]['method']} | {len(g)} | {stat(g, 'final_accuracy', '.4f')} | "
      f"{stat(g, 'accuracy_at_50pct', '.4f')} | {stat(g, 'train_seconds', '.0f')} |\n"
      for base, g in seed_groups(rows).items())


def task_markdown(rows: list[dict[str, Any]]) -> str:
  """Per-task accuracy of multiple-choice runs: the base model (the first run's round 0), then each run.

  ``avg`` and ``avg (norm)`` are the means over tasks of ``accuracy/<task>`` and
  ``accuracy_norm/<task>`` (:mod:`hetlora.models.multiple_choice`).
  """
  first = next(r for r in rows if r["by_task"])
  tasks = [k.split("/", 1)[1] for k in first["by_task"] if k.startswith("accuracy/")]
  head = (f"| run | method | {' | '.join(tasks)} | avg | avg (norm) | train / eval time (s) |\n"
          f"|{'---|' * (len(tasks) + 5)}\n")

  def line(run, method, metrics, seconds):
    acc = [metrics.get(f"accuracy/{t}", float("nan")) for t in tasks]
    norm = [metrics.get(f"accuracy_norm/{t}", float("nan")) for t in tasks]
    cells = " | ".join(f"{a:.3f}" for a in acc)
    return f"| {run} | {method} | {cells} | {np.mean(acc):.3f} | {np.mean(norm):.3f} | {seconds} |\n"

  base = next((r for r in rows if r["zero_shot_by_task"]), None)
  body = line("base model (round 0)", "-", base["zero_shot_by_task"], "-") if base else ""
  body += "".join(line(r["run"], r["method"], r["by_task"], f"{r['train_seconds']:.0f} / {r['eval_seconds']:.0f}")
                  for r in rows)
  return head + body


GENERATION_COLUMNS = (("ROUGE-L, seen tasks", "test_rougeL"), ("ROUGE-L, unseen tasks", "test_rougeL_unseen"),
                      ("exact match, seen", "test_exact_match"), ("exact match, unseen", "test_exact_match_unseen"),
                      ("answer loss, seen", "test_loss"), ("answer loss, unseen", "test_loss_unseen"))


def generation_markdown(rows: list[dict[str, Any]]) -> str:
  """Language models evaluated by generation: the base model (the first run with a round 0), then
  each run's last evaluation; ``-`` where a metric is not recorded (no unseen tasks, no
  classification-like tasks)."""
  head = (f"| run | method | {' | '.join(c for c, _ in GENERATION_COLUMNS)} | train / eval time (s) |\n"
          f"|{'---|' * (len(GENERATION_COLUMNS) + 3)}\n")

  def line(run, method, metrics, seconds):
    cells = " | ".join(f"{metrics[k]:.3f}" if k in metrics else "-" for _, k in GENERATION_COLUMNS)
    return f"| {run} | {method} | {cells} | {seconds} |\n"

  base = next((r for r in rows if r["zero_shot_generation"]), None)
  body = line("base model (round 0)", "-", base["zero_shot_generation"], "-") if base else ""
  body += "".join(line(r["run"], r["method"], r["generation"], f"{r['train_seconds']:.0f} / {r['eval_seconds']:.0f}")
                  for r in rows if r["generation"])
  return head + body


def rank_markdown(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """Clients per rank, at the start and after every round whose counts changed, for each run whose
  ranks change (self-pruning); one line names the runs whose ranks never change."""
  changed, still = [], []
  for name, s in summaries.items():
    by_round = s.get("rank_counts_by_round") or []
    (changed if len({json.dumps(c) for _, c in by_round}) > 1 else still).append(name)
  parts = []
  for name in changed:
    by_round = summaries[name]["rank_counts_by_round"]
    ranks = sorted({int(k) for _, counts in by_round for k in counts})
    parts.append(f"{name}: clients per rank\n\n| round | " + " | ".join(f"r={r}" for r in ranks)
                 + " | mean rank |\n|" + "---|" * (len(ranks) + 2) + "\n")
    previous = None
    for i, (rnd, counts) in enumerate(by_round):
      if counts == previous and i != len(by_round) - 1:
        continue
      n = [counts.get(str(r), 0) for r in ranks]
      mean = sum(r * c for r, c in zip(ranks, n)) / max(sum(n), 1)
      parts[-1] += f"| {rnd} | " + " | ".join(str(c) for c in n) + f" | {mean:.2f} |\n"
      previous = counts
  if still:
    parts.append("No client's rank changed in: " + ", ".join(still) + ".\n")
  return "\n".join(parts)


def load_config_module(path: str | Path):
  """The config file at ``path`` as a module (its directory importable, for ``import common``)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist; pass --config <file>.py[:arg].")
  directory = str(path.resolve().parent)
  if directory not in sys.path:
    sys.path.insert(0, directory)
  spec = importlib.util.spec_from_file_location(f"compare_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_overrides(text: str) -> dict[str, Any]:
  """``'a.b=3 c.d="x y"'`` -> ``{'a.b': 3, 'c.d': 'x y'}`` (Python literals, else strings).

  Raises:
    ValueError: an item is not ``key=value``.
  """
  out = {}
  for item in shlex.split(text):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"config overrides item {item!r} must be key=value, e.g. server.rounds=3.")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
  """``'prune_off: method.kwargs.prune=False'`` -> ``('prune_off', {'method.kwargs.prune': False})``.

  Raises:
    ValueError: no ``name:`` prefix, a name that is not ``[A-Za-z0-9.-]+`` (it names a
      folder and a table row), or a malformed override.
  """
  name, sep, overrides = text.partition(":")
  name = name.strip()
  if not sep or not re.fullmatch(r"[A-Za-z0-9.-]+", name):
    raise ValueError(f"variant {text!r} must be 'name: field=value ...' with a name of letters, digits, "
                     "'.' or '-', e.g. 'no-pruning: method.kwargs.prune=False'.")
  return name, parse_overrides(overrides)


def method_configs(config: str, methods: Sequence[str], alphas: Sequence[str | float],
                   overrides: Mapping[str, Any] | None = None,
                   variants: Mapping[str, Mapping[str, Any]] | None = None,
                   seeds: Sequence[int] | None = None) -> dict[str, ml_collections.ConfigDict]:
  """One locked config per ``(alpha, method[, variant][, seed])``, named
  ``<method>[_<variant>]_alpha<alpha>[_seed<seed>]``.

  Args:
    config: ``path/to/config.py`` or ``path/to/config.py:arg``; ``get_config``
      is called with ``arg,method=<m>,alpha=<a>`` (so the method and alpha
      win over the same keys in ``arg``).
    methods, alphas: the config's ``method=`` and ``alpha=`` values.
    overrides: flat ``{'server.rounds': 3}`` applied to every config, e.g.
      ``config_flags.get_override_values(FLAGS['config'])``.
    variants: ``{name: flat overrides}`` for ablations: every method then runs once per
      variant, its overrides applied after ``overrides`` (e.g. ``{'gamma0.9':
      {'method.kwargs.gamma': 0.9}}``); ``None``: one run per method, no suffix.
    seeds: ``config.seed`` values: every run then repeats once per seed (the seed sets
      the clients' data split, their ranks, the cohorts, the initial adapter and any
      subsample of the data);
      ``None``: the config's own seed, no suffix.
  """
  path, _, arg = config.partition(":")
  module = load_config_module(path)
  out = {}
  for alpha in alphas:
    for method in methods:
      for variant, changes in (variants or {"": {}}).items():
        for seed in seeds or [None]:
          c = module.get_config(",".join(filter(None, [arg, f"method={method}", f"alpha={alpha}"])))
          for flat in (overrides, changes, None if seed is None else {"seed": int(seed)}):
            if flat:
              c.update_from_flattened_dict(dict(flat))
          c.lock()
          suffix = None if seed is None else f"seed{seed}"
          out["_".join(filter(None, [method, variant, f"alpha{alpha}", suffix]))] = c
  return out


def compare(configs: Mapping[str, ml_collections.ConfigDict], out_dir: str | Path,
            progress: bool = True, record: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """Runs every config in ``out_dir/<name>``; writes (process 0) and returns the table rows.

  ``record``: provenance to keep at the top of ``results.json`` (``launch/compare.py`` passes
  the command line, the date and the machine).
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  summaries = {name: trainer.run(cfg, out_dir / name, progress=progress) for name, cfg in configs.items()}
  rows = [row(name, s) for name, s in summaries.items()]
  if jax.process_index() == 0:
    (out_dir / "results.json").write_text(
        json.dumps({**dict(record or {}), "rows": rows, "summaries": summaries}, indent=2))
    tables = markdown(rows)
    if seed_groups(rows):
      tables += "\n" + seed_markdown(rows)
    if any(r["by_task"] for r in rows):
      tables += "\n" + task_markdown(rows)
    if any(r["generation"] for r in rows):
      tables += "\n" + generation_markdown(rows)
    (out_dir / "results.md").write_text(tables + "\n" + rank_markdown(summaries))
    _plot(summaries, out_dir / "accuracy.png")
  return rows


def _plot(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, s in summaries.items():
    if s["accuracy_by_round"]:
      r, acc = np.asarray(s["accuracy_by_round"]).T
      ax.plot(r, acc, marker=".", label=name)
  ax.set(xlabel="round", ylabel="test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
