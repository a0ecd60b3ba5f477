"""Ours vs the sequential PyTorch + PEFT peer on identical HetLoRA work.

Work per round (both): all-MiniLM-L6-v2 as a 77-way BANKING77 classifier,
N = 100 clients (Dirichlet 0.5 label split), K = 8 sampled per round, ranks
uniform in [2, 16] fixed per client, 10 local AdamW steps (lr 5e-4) of batch
16 at sequence length 64, LoRA on attention query/value with scale
alpha / r_max, HetLoRA sparsity-weighted aggregation. Differences, stated:
the peer trains a full classifier head (FedAvg'd) and applies LoRA dropout
0.05; ours adapts the head with LoRA (rank r_k) and has no dropout.

The peer (``/work/shared/peer/torch_hetlora.py``) runs in its own venv as a
subprocess; ours runs in a fresh subprocess of this script (``--ours``) so
each peak RSS is its own. Both report the median round time after the first
round (ours: the first round compiles) and training examples/s =
K * steps * batch / median round seconds. A round includes host batching,
training and aggregation, not evaluation.

``--padding dynamic`` (or ``both``) runs the pair: the peer trims every batch to its longest
sequence (``--dynamic-padding``); ours trims the whole round to the
smallest length bucket (16, 32, 48, 64) that holds its longest sequence
(shapes must be equal within a round; each bucket compiles once).

Run::

    python benchmarks/peer_comparison.py                      # fixed length 64
    python benchmarks/peer_comparison.py --padding dynamic
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

PEER = Path("/work/shared/peer/torch_hetlora.py")
PEER_PYTHON = Path("/work/peer-venv/bin/python")
DATA = Path("/work/shared/data/banking77")
BUCKETS = (16, 32, 48, 64)


# (peer flag, our flag, attribute): the shared work description.
WORK = (("--num-clients", "--num-clients", "num_clients"),
        ("--clients-per-round", "--clients-per-round", "clients_per_round"),
        ("--local-steps", "--local-steps", "local_steps"), ("--batch-size", "--batch", "batch"),
        ("--max-seq-len", "--seq-len", "seq_len"), ("--rounds", "--rounds", "rounds"),
        ("--r-min", "--r-min", "r_min"), ("--r-max", "--r-max", "r_max"),
        ("--dirichlet-alpha", "--dirichlet", "dirichlet"), ("--seed", "--seed", "seed"),
        ("--data-dir", "--data-dir", "data_dir"))


def work_flags(a, peer: bool) -> list[str]:
  """Command-line flags for the shared work, in the peer's or in our spelling."""
  return [x for theirs, mine, attr in WORK for x in (theirs if peer else mine, str(getattr(a, attr)))]


def last_json_line(text: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"no JSON line in output:\n{text[-3000:]}")


def run_peer(a, dynamic: bool) -> dict:
  cmd = [str(a.peer_python), str(PEER), *work_flags(a, peer=True), "--threads", str(a.threads), "--quiet"]
  cmd += ["--dynamic-padding"] if dynamic else []
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
  if proc.returncode:
    raise RuntimeError(f"peer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return last_json_line(proc.stdout)


def run_ours_subprocess(a, dynamic: bool) -> dict:
  cmd = [sys.executable, __file__, "--ours", *work_flags(a, peer=False)]
  cmd += ["--dynamic-padding"] if dynamic else []
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
  if proc.returncode:
    raise RuntimeError(f"ours failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return last_json_line(proc.stdout)


def bucket(length: int) -> int:
  """The smallest bucket holding ``length`` tokens."""
  return next((b for b in BUCKETS if b >= length), BUCKETS[-1])


def ours(a, dynamic: bool) -> dict:
  """Runs our HetLoRA rounds on the peer's work; returns a result dict like the peer's."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import setups
  from hetlora import data, methods, server
  from hetlora.models import tokenizer

  t_start = time.perf_counter()
  train = data.banking77("train", data_dir=a.data_dir)
  tok = tokenizer.load_tokenizer(setups.MINILM, max_len=a.seq_len)
  cols = data.tokenize_dataset(train, lambda t: tokenizer.encode(tok, t, max_len=a.seq_len), a.seq_len)
  parts = data.dirichlet(np.asarray(train.labels), a.num_clients, a.dirichlet, seed=a.seed, min_size=10)
  rng = np.random.default_rng(a.seed)
  client_ranks = rng.integers(a.r_min, a.r_max + 1, size=a.num_clients)
  setup = setups.minilm(a.r_max, seq_len=a.seq_len, num_labels=len(set(train.labels)))
  method = methods.get("hetlora", lam=0.0, prune=False)   # sparsity-weighted aggregation, fixed ranks
  state = server.init(setup.global_lora, client_ranks, method)
  round_fn = server.make_round(setup.spec, method, "vmap")
  t_setup = time.perf_counter() - t_start

  times, lengths, losses = [], [], []
  for r in range(a.rounds):
    t0 = time.perf_counter()
    cohort = server.sample_cohort(a.seed, r, a.num_clients, a.clients_per_round)
    packed = data.pack_cohort(cols, [parts[c] for c in cohort], a.batch, local_steps=a.local_steps,
                              seed=a.seed, round_idx=r, client_ids=cohort)
    length = bucket(int(packed["attention_mask"].sum(-1).max())) if dynamic else a.seq_len
    batch = {k: packed[k][..., :length] for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["label"] = packed["label"]
    state, result = round_fn(state, setup.base, jnp.asarray(cohort), {"batch": batch, "mask": packed["mask"]},
                             packed["num_examples"])
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    lengths.append(length)
    losses.append(float(jnp.mean(result.loss)))
  later = times[1:] or times
  med = float(np.median(later))
  return {
      "system": "hetlora (JAX, vmapped clients)",
      "dynamic_padding": dynamic,
      "round_s": [round(t, 3) for t in times],
      "round_lengths": lengths,
      "mean_client_loss": [round(x, 4) for x in losses],
      "setup_s": round(t_setup, 2),
      "first_round_minus_median_s": round(times[0] - med, 2),
      "wall_per_round_s_median_after_first": round(med, 3),
      "train_examples_per_s": round(a.clients_per_round * a.local_steps * a.batch / med, 2),
      "peak_rss_mib": round(common.peak_rss_mib(), 1),
      "loadavg_at_end": common.loadavg(),
      "jax_devices": [str(d) for d in jax.devices()],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ours", action="store_true", help="internal: run only ours, print one JSON line")
  p.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
  p.add_argument("--data-dir", type=Path, default=DATA)
  p.add_argument("--num-clients", type=int, default=100)
  p.add_argument("--clients-per-round", type=int, default=8)
  p.add_argument("--local-steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--r-min", type=int, default=2)
  p.add_argument("--r-max", type=int, default=16)
  p.add_argument("--dirichlet", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2, help="peer torch threads")
  p.add_argument("--padding", default="fixed", choices=["fixed", "dynamic", "both"],
                 help="fixed length, dynamic padding (peer) / length buckets (ours), or both")
  p.add_argument("--dynamic-padding", action="store_true", help="internal, with --ours")
  a = p.parse_args(argv)
  if a.ours:
    print(json.dumps(ours(a, a.dynamic_padding)), flush=True)
    return
  if not a.peer_python.exists():
    sys.exit(f"{a.peer_python} is missing; build the peer venv as in /work/shared/peer/README.md.")

  rows, raw = [], {}
  modes = {"fixed": [False], "dynamic": [True], "both": [False, True]}[a.padding]
  for dynamic in modes:
    mode = "dynamic" if dynamic else "fixed-64"
    for name, run in (("peer", run_peer), ("ours", run_ours_subprocess)):
      load = common.loadavg()
      res = run(a, dynamic)
      raw[f"{name}_{mode}"] = res
      rows.append({"system": name, "padding": mode,
                   "examples_per_s": res["train_examples_per_s"],
                   "round_s_median": res["wall_per_round_s_median_after_first"],
                   "peak_rss_mib": res["peak_rss_mib"],
                   "loadavg_before": load, "loadavg_after": res["loadavg_at_end"]})
      print(rows[-1], flush=True)
    ours_row, peer_row = rows[-1], rows[-2]
    ours_row["speedup_vs_peer"] = ours_row["examples_per_s"] / peer_row["examples_per_s"]
    ours_row["rss_ratio_vs_peer"] = ours_row["peak_rss_mib"] / peer_row["peak_rss_mib"]

  columns = ["system", "padding", "examples_per_s", "round_s_median", "peak_rss_mib",
             "speedup_vs_peer", "rss_ratio_vs_peer", "loadavg_before", "loadavg_after"]
  notes = (f"MiniLM-L6 on BANKING77, N={a.num_clients}, K={a.clients_per_round}, "
           f"{a.local_steps} local steps, batch {a.batch}, length {a.seq_len}, ranks "
           f"{a.r_min}..{a.r_max}, {a.rounds} rounds (median after the first), peer with "
           f"{a.threads} torch threads. See the module docstring for the differences in work.")
  name = "peer_comparison" + ("" if a.padding == "fixed" else f"_{a.padding}")
  common.write(name, {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows,
                                   "raw": raw}, common.markdown_table(rows, columns), notes)


if __name__ == "__main__":
  main()
