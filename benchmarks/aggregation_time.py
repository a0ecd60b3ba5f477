"""Time of every method's aggregator on a large stacked adapter.

Input: ``--layers`` adapted modules (one ``[d, d]`` projection per layer),
stacked over K clients: ``a: [K, d, r_max]``, ``b: [K, r_max, d]`` per module
(default d = 1024, 24 layers, K = 64, r_max = 64: 2 x 24 x 16 MiB = 768 MiB
of float32 factors), ranks uniform in ``[1, r_max]``, random factors,
``n_k`` uniform in [10, 200], scales ``alpha / r_k``.

Every method module whose ``aggregate`` has the shared signature
``(lora, ranks, num_examples, scales)`` (:func:`hetlora.methods.names`; all
but HeLoRA-KD, whose groups replace the scales) is compiled once and timed over
``--repeats`` calls (once if the first call exceeds ``--slow-seconds``);
reported: compile seconds, the median call and XLA's compiled memory
(arguments + outputs + temporaries, ``memory_analysis()``).

Run::

    python benchmarks/aggregation_time.py
    python benchmarks/aggregation_time.py --methods flexlora,hetlora   # a subset
"""

from __future__ import annotations

import argparse
import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from decoder_round import memory_of
from hetlora import methods
from hetlora import lora as lora_lib


def stacked_problem(k: int, d: int, layers: int, r_max: int, seed: int = 0):
  """``(lora, ranks, num_examples, scales)`` with ``a: [K, d, r_max]``, ``b: [K, r_max, d]`` per layer."""
  key = jax.random.key(seed)
  lora = {}
  for i in range(layers):
    key, ka, kb = jax.random.split(key, 3)
    lora[f"layer_{i}"] = {"proj": {"a": jax.random.normal(ka, (k, d, r_max)) / np.sqrt(d),
                                   "b": 0.01 * jax.random.normal(kb, (k, r_max, d))}}
  rng = np.random.default_rng(seed)
  ranks = jnp.asarray(rng.integers(1, r_max + 1, size=k), jnp.int32)
  num_examples = jnp.asarray(rng.integers(10, 201, size=k), jnp.float32)
  scales = lora_lib.scale(ranks, 2.0 * r_max, "alpha/r", r_max)
  return jax.block_until_ready((lora, ranks, num_examples, scales))


def shared_signature() -> list[str]:
  """The methods whose module-level ``aggregate`` takes ``(lora, ranks, num_examples, scales)``."""
  def params(name):
    return list(inspect.signature(methods.module(name).aggregate).parameters)[:4]
  return [n for n in methods.names() if params(n) == ["lora", "ranks", "num_examples", "scales"]]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--clients", type=int, default=64)
  p.add_argument("--d", type=int, default=1024)
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--r-max", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--slow-seconds", type=float, default=20.0,
                 help="an aggregator whose first call takes longer is timed once")
  p.add_argument("--methods", default=None, help="comma-separated subset (default: every method)")
  p.add_argument("--out", default="aggregation_time", help="results/<out>.json and .md")
  args = p.parse_args(argv)

  names = shared_signature()
  if args.methods:
    unknown = sorted(set(args.methods.split(",")) - set(names))
    if unknown:
      p.error(f"--methods {unknown} are not among the timed methods {names}")
    names = args.methods.split(",")
  inputs = stacked_problem(args.clients, args.d, args.layers, args.r_max)
  rows = []
  for name in names:
    fn = jax.jit(methods.module(name).aggregate)
    load = common.loadavg()
    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_of(compiled)
    t0 = time.perf_counter()
    out = common.block(compiled(*inputs))
    times = [time.perf_counter() - t0]
    if times[0] < args.slow_seconds:  # slow aggregators are timed once
      times += common.time_calls(lambda: compiled(*inputs), args.repeats - 1)
    widths = sorted({lora_lib.r_max_of(out)})
    rows.append({"aggregator": name, "compile_s": compile_s, "median_s": common.median(times),
                 "times_s": [round(t, 4) for t in times], "output_rank_width": widths[0],
                 "compiled_mib": mem.total / 2**20, "temp_mib": mem.temp / 2**20,
                 "loadavg_before": load})
    print(rows[-1], flush=True)

  notes = (f"K={args.clients} clients, {args.layers} layers x one adapted [{args.d}, {args.d}] module, "
           f"r_max={args.r_max}, ranks uniform in [1, r_max], float32, {jax.devices()[0].platform}; "
           f"median of {args.repeats} calls after compilation (one call if the first takes more "
           f"than {args.slow_seconds:g} s).")
  columns = ["aggregator", "median_s", "compile_s", "compiled_mib", "temp_mib", "output_rank_width",
             "loadavg_before"]
  common.write(args.out, {"args": vars(args), "rows": rows},
               common.markdown_table(rows, columns), notes)


if __name__ == "__main__":
  main()
