"""One MiniLM round on Flower's deployment engine (localhost) against the in-process sequential backend.

The main job's config (``configs/tweets_hetlora.py``: MiniLM, 20 clients, 5 a
round, 8 local steps of 16 tweets) runs ``--rounds`` rounds twice:

- ``in-process``: :func:`hetlora.trainer.run` with ``client.backend='sequential'``;
- ``flower-localhost``: the Flower App (``launch/flower``) on a SuperLink and
  ``--nodes`` SuperNodes, separate processes on this machine
  (:mod:`hetlora.flower.localhost`); node ``k`` holds clients ``k, k + nodes, ...``
  and a persistent XLA cache, so a round's ``ClientApp`` processes (one per
  message) load the compiled local training instead of compiling it again.
  With ``--site-workers`` each SuperNode hands its messages to a long-lived
  site worker (:mod:`hetlora.flower.site_worker`), which builds the
  experiment and compiles once for the run.

Reported per round: wall time (``time.round_s`` of ``metrics.jsonl``: from
sampling to the new server state, evaluation excluded) and, for Flower, the
bytes of array payload sent to and from each cohort client. Round 1
includes compilation (and, for Flower, the SuperNodes' first query). With
``--drop``, one SuperNode holding a client of the last round is killed
while that round runs, and the round's record shows what became of it.

Run::

    python benchmarks/flower_round.py --rounds 2 --nodes 5
    python benchmarks/flower_round.py --rounds 3 --nodes 5 --site-workers --name flower_round_site_workers
    python benchmarks/flower_round.py --rounds 3 --nodes 2 --clients 4 --drop --round-timeout 60 --skip-in-process \
        --config configs/tweets_hetlora.py:runlocal --overrides "data.num_clients=4 server.clients_per_round=2" \
        --name flower_round_drop
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
from hetlora import server, trainer
from hetlora.flower import localhost

CONFIG = "configs/tweets_hetlora.py"


def _rows(workdir: Path) -> list[dict]:
  path = workdir / trainer.METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _overrides(rounds: int, extra: str) -> str:
  return f"server.rounds={rounds} eval.every={rounds} checkpoint_every={rounds} {extra}".strip()


def _in_process(root: Path, rounds: int, config: str, extra: str) -> list[dict]:
  """The README's entry point, ``launch/train.py``, with the sequential backend."""
  flags = [f"--config.{item}" for item in _overrides(rounds, extra).split()]
  subprocess.run([sys.executable, str(common.ROOT / "launch/train.py"), f"--config={common.ROOT / config}",
                  f"--workdir={root / 'in_process'}", "--config.client.backend=sequential", *flags], check=True)
  return _rows(root / "in_process")


def _killer(fed, workdir: Path, rounds: int, nodes: int, num_clients: int, notes: dict) -> None:
  """Kills the SuperNode of the last round's first client a few seconds into that round."""
  while len([r for r in _rows(workdir) if r["round"] >= 1]) < rounds - 1:
    time.sleep(0.5)
  config = json.loads((workdir / "config.json").read_text())
  cohort = server.sample_cohort(config["seed"], rounds - 1, num_clients, config["server"]["clients_per_round"])
  node = int(cohort[0]) % nodes
  time.sleep(3.0)
  fed.nodes[node].kill()
  notes.update(killed_node=node, its_clients=list(range(node, num_clients, nodes)),
               killed_at=time.time(), last_cohort=cohort.tolist())


def _flower(root: Path, rounds: int, nodes: int, n: int, drop: bool, round_timeout: float, config: str,
            extra: str, site_workers: bool) -> tuple[list[dict], dict]:
  node_configs = [{"client-ids": ",".join(str(c) for c in range(k, n, nodes)), "xla-cache": str(root / "xla")}
                  for k in range(nodes)]
  workdir, notes = root / "flower", {}
  with localhost.federation(root / "federation", node_configs, site_workers=site_workers) as fed:
    if drop:
      threading.Thread(target=_killer, daemon=True, args=(
          fed, workdir, rounds, nodes, n, notes)).start()
    localhost.run_app(fed, {"config": str(common.ROOT / config), "overrides": _overrides(rounds, extra),
                            "workdir": str(workdir), "min-nodes": nodes, "round-timeout": round_timeout})
  return _rows(workdir), notes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--nodes", type=int, default=5)
  parser.add_argument("--drop", action="store_true", help="kill a SuperNode during the last round")
  parser.add_argument("--clients", type=int, default=20, help="the config's data.num_clients")
  parser.add_argument("--round-timeout", type=float, default=600.0)
  parser.add_argument("--skip-in-process", action="store_true")
  parser.add_argument("--site-workers", action="store_true",
                      help="each SuperNode hands its messages to a long-lived site worker (hetlora.flower.site_worker)")
  parser.add_argument("--name", default="flower_round")
  parser.add_argument("--config", default=CONFIG, help="experiment config, path[:arg] from the repository")
  parser.add_argument("--overrides", default="", help="more config fields, 'model.name=/m data.num_clients=4'")
  args = parser.parse_args()
  rows, payload = [], {"config": args.config, "overrides": args.overrides, "rounds": args.rounds, "nodes": args.nodes, "loadavg_at_start": common.loadavg()}
  with tempfile.TemporaryDirectory(prefix="flower_round_") as tmp:
    root = Path(tmp)
    if not args.skip_in_process:
      for row in _in_process(root, args.rounds, args.config, args.overrides):
        rows.append({"engine": "in-process sequential", "round": row["round"], "round_s": row["time"]["round_s"],
                     "clients": str(row["client_ids"])})
    flower_rows, notes = _flower(root, args.rounds, args.nodes, args.clients, args.drop, args.round_timeout,
                                  args.config, args.overrides, args.site_workers)
    engine = f"flower localhost, {args.nodes} SuperNodes" + (" + site workers" if args.site_workers else "")
    for row in flower_rows:
      rows.append({"engine": engine, "round": row["round"],
                   "round_s": row["time"]["round_s"], "clients": str(row["client_ids"]),
                   "ranks": str(row["ranks"]), "bytes_down": str(row["bytes_down"]), "bytes_up": str(row["bytes_up"]),
                   "missing": str(row["missing_clients"]), "excluded": str(row["excluded_clients"])})
    payload.update(rows=rows, drop=notes, final_flower=flower_rows[-1] if flower_rows else None)
  table = common.markdown_table(rows, ["engine", "round", "round_s", "clients", "ranks", "bytes_down", "bytes_up",
                                       "missing", "excluded"])
  common.write(args.name, payload, table, notes=f"`python benchmarks/flower_round.py {' '.join(sys.argv[1:])}`"
               + (f"\n\nkilled: {notes}" if notes else ""))


if __name__ == "__main__":
  main()
