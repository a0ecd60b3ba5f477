"""Training throughput of one round: vmapped clients vs a sequential loop vs the centralized limit.

For each cohort size K, the same work (K clients x ``steps`` local steps x
``batch`` examples, mixed ranks in ``[r_min, r_max]``):

- ``vmap``: ``server.make_round(spec, methods.get('hetlora', ...), backend='vmap')``, one jitted
  program (distribute + vmapped local training + aggregation);
- ``sequential``: the same round with ``backend='sequential'`` (a Python loop
  over one jitted client, :func:`hetlora.client.sequential_backend`);
- ``centralized``: the limit of batching, one LoRA client
  (:func:`hetlora.client.local_train`) trained for ``steps`` steps on the
  concatenated batch ``[steps, K * batch]`` of all clients.

Reported: training examples/s (median of ``--repeats`` calls after the
compiling one), compile seconds (lower + compile, or first call minus a
steady call for the sequential loop), XLA's compiled memory
(arguments + outputs + temporaries), the process's peak RSS, and for the
vmap round with ``--flops`` its FLOPs (:func:`round_flops`) and achieved TFLOP/s.

Run::

    python benchmarks/round_throughput.py                      # tiny MLP, K in {4, 16, 64}
    python benchmarks/round_throughput.py --model minilm --clients 4,8 --steps 2 --batch 8
    python benchmarks/round_throughput.py --model minilm --dtype bfloat16 --cases vmap --flops  # GPU
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import common
import setups
from decoder_round import memory_of
from hetlora import methods
from hetlora import client as client_lib
from hetlora import server


def round_flops(round_fn, args) -> float:
  """FLOPs of one round ``round_fn(*args)``, from XLA's cost analysis of the compiled round.

  The analysis counts a loop body once and the clients scan over their local
  steps, so the round is compiled again with one local step (the data cut to
  ``[K, 1, ...]``) and its FLOPs are multiplied by ``steps``. Distribution and
  aggregation are then counted ``steps`` times: 0.013% of a one-step MiniLM
  round (K = 8 or 32, batch 16 x 64 tokens), so the overcount is negligible.
  """
  state, base, cohort, data, n = args
  steps = jax.tree.leaves(data)[0].shape[1]
  one = jax.tree.map(lambda x: x[:, :1], data)
  return steps * round_fn.lower(state, base, cohort, one, n).compile().cost_analysis()["flops"]


def _round_case(setup, k, steps, batch, ranks, backend, repeats, with_flops=False):
  """``(compile_s, [seconds per call], compiled memory or None, FLOPs or None)`` of one server round."""
  data = setup.cohort(k, steps, batch, seed=k)
  method = methods.get("hetlora", lam=0.0, prune=False)   # sparsity-weighted aggregation, fixed ranks
  state = server.init(setup.global_lora, ranks, method)
  cohort = jnp.arange(k, dtype=jnp.int32)
  n = jnp.full((k,), float(steps * batch))
  round_fn = server.make_round(setup.spec, method, backend)
  args = (state, setup.base, cohort, data, n)
  if backend == "vmap":
    t0 = time.perf_counter()
    compiled = round_fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_of(compiled).total
    flops = round_flops(round_fn, args) if with_flops else None
    return compile_s, common.time_calls(lambda: compiled(*args), repeats), mem, flops
  first = common.time_calls(lambda: round_fn(*args), 1)[0]
  times = common.time_calls(lambda: round_fn(*args), repeats)
  return max(first - common.median(times), 0.0), times, None, None


def _centralized_case(setup, k, steps, batch, r_max, repeats):
  """One client of rank ``r_max`` on ``[steps, K * batch]``: the centralized limit."""
  data = setup.cohort(1, steps, k * batch, seed=k)
  data = jax.tree.map(lambda x: x[0], data)
  rank = jnp.asarray(r_max, jnp.int32)
  train = jax.jit(lambda base, lora, r, d: client_lib.local_train(setup.spec, base, lora, r, d))
  args = (setup.base, setup.global_lora, rank, data)
  t0 = time.perf_counter()
  compiled = train.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = memory_of(compiled).total
  return compile_s, common.time_calls(lambda: compiled(*args), repeats), mem, None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute dtype of the minilm model (model.dtype)")
  p.add_argument("--cases", default="vmap,centralized,sequential",
                 help="comma-separated: vmap, centralized, sequential")
  p.add_argument("--flops", action="store_true",
                 help="also the vmap round's FLOPs (one more compile, round_flops) and TFLOP/s")
  p.add_argument("--clients", default="4,16,64", help="comma-separated cohort sizes K")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--r-min", type=int, default=2)
  p.add_argument("--r-max", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--skip-sequential-above", type=int, default=1 << 30,
                 help="skip the sequential loop for larger K (it is slow for big models)")
  p.add_argument("--out", default=None, help="result name (default round_throughput_<model>)")
  args = p.parse_args(argv)

  setup = setups.setup(args.model, args.r_max, **({"dtype": args.dtype} if args.model == "minilm" else {}))
  wanted = args.cases.split(",")
  rows = []
  for k in [int(x) for x in args.clients.split(",")]:
    ranks = setups.ranks(k, args.r_min, args.r_max, seed=k)
    examples = k * args.steps * args.batch
    cases = {"vmap": lambda: _round_case(setup, k, args.steps, args.batch, ranks, "vmap", args.repeats,
                                         args.flops),
             "centralized": lambda: _centralized_case(setup, k, args.steps, args.batch, args.r_max,
                                                      args.repeats)}
    if k <= args.skip_sequential_above:
      cases["sequential"] = lambda: _round_case(setup, k, args.steps, args.batch, ranks, "sequential",
                                                args.repeats)
    row = {"K": k, "examples_per_round": examples, "loadavg_before": common.loadavg()}
    for name, run in cases.items():
      if name not in wanted:
        continue
      compile_s, times, mem, flops = run()
      row[f"{name}_ex_per_s"] = examples / common.median(times)
      row[f"{name}_times_s"] = [round(t, 4) for t in times]
      row[f"{name}_compile_s"] = compile_s
      row[f"{name}_compiled_mib"] = None if mem is None else mem / 2**20
      if flops is not None:
        row[f"{name}_flops_per_round"] = flops
        row[f"{name}_tflop_per_s"] = flops / common.median(times) / 1e12
      print(f"K={k} {name}: {row[f'{name}_ex_per_s']:.1f} ex/s, compile {compile_s:.2f}s", flush=True)
    if "sequential_ex_per_s" in row:
      row["vmap_over_sequential"] = row["vmap_ex_per_s"] / row["sequential_ex_per_s"]
    if "centralized_ex_per_s" in row:
      row["vmap_over_centralized"] = row["vmap_ex_per_s"] / row["centralized_ex_per_s"]
    row["loadavg_after"] = common.loadavg()
    row["peak_rss_mib_so_far"] = common.peak_rss_mib()
    rows.append(row)

  columns = ["K", "vmap_ex_per_s", "sequential_ex_per_s", "centralized_ex_per_s",
             "vmap_over_sequential", "vmap_over_centralized", "vmap_tflop_per_s", "vmap_compile_s",
             "sequential_compile_s", "centralized_compile_s", "vmap_compiled_mib",
             "centralized_compiled_mib", "peak_rss_mib_so_far", "loadavg_after"]
  notes = (f"Model `{args.model}` ({args.dtype}), {args.steps} local steps, batch {args.batch}, ranks "
           f"uniform in [{args.r_min}, {args.r_max}], HetLoRA aggregation in the vmap/sequential rounds; "
           f"centralized = one rank-{args.r_max} client on the concatenated [steps, K*batch] data. "
           f"Median of {args.repeats} calls after compilation. Compiled MiB = XLA arguments + "
           "outputs + temporaries; peak RSS is the whole process's so far.")
  name = args.out or f"round_throughput_{args.model}"
  common.write(name, {"args": vars(args), "rows": rows}, common.markdown_table(rows, columns), notes)


if __name__ == "__main__":
  main()
