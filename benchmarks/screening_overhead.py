"""What screening the uploads and client-level DP cost per round, against the plain round.

Cases, each a jitted zero-padding round (a DP-capable method) on the same
synthetic cohort:

- ``plain``: the default round; its always-on screen (non-finite check and
  factor-update norms) is part of it;
- ``screen_only``: the screen alone (:func:`hetlora.screening.screen` on the
  round's stacked factors), to show what the always-on part costs;
- ``bounded_clipped``: ``server.max_update_norm`` and ``client.clip_norm`` set;
- ``dp``: clipping plus DP-FedAvg noise (uniform weights, Gaussian noise).

Reported: median seconds per call after compilation, and each case's
overhead relative to ``plain`` (``screen_only`` relative to the plain round).

Run::

    python benchmarks/screening_overhead.py --model minilm --clients 8 --steps 4 --batch 16
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import common
import setups
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import privacy
from hetlora import screening
from hetlora import server


def _round(setup, k, steps, batch, ranks, repeats, **options):
  method = methods.get("zero_pad")
  state = server.init(setup.global_lora, ranks, method)
  round_fn = server.make_round(setup.spec, method, "vmap", **options)
  args = (state, setup.base, jnp.arange(k, dtype=jnp.int32), setup.cohort(k, steps, batch, seed=k),
          jnp.full((k,), float(steps * batch)))
  compiled = round_fn.lower(*args, key=jax.random.key(0)).compile()
  return common.time_calls(lambda: compiled(*args, key=jax.random.key(0)), repeats)


def _screen_only(setup, ranks, repeats):
  start = lora_lib.truncate(setup.global_lora, ranks)
  trained = jax.tree.map(lambda x: x + 1e-3, start)
  fn = jax.jit(lambda s, t, loss: screening.screen(screening.Screening(1e3, 1.0), s, t, loss))
  args = (start, trained, jnp.zeros(ranks.shape[0]))
  common.block(fn(*args))
  return common.time_calls(lambda: fn(*args), repeats)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--r-max", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None, help="result name (default screening_overhead_<model>)")
  args = p.parse_args(argv)

  setup = setups.setup(args.model, args.r_max)
  k = args.clients
  ranks = setups.ranks(k, 1, args.r_max, seed=k)
  clip = screening.Screening(max_norm=1e3, clip_norm=1.0)
  cases = {
      "plain": lambda: _round(setup, k, args.steps, args.batch, ranks, args.repeats),
      "screen_only": lambda: _screen_only(setup, ranks, args.repeats),
      "bounded_clipped": lambda: _round(setup, k, args.steps, args.batch, ranks, args.repeats,
                                        screening=clip),
      "dp": lambda: _round(setup, k, args.steps, args.batch, ranks, args.repeats, screening=clip,
                           privacy=privacy.Privacy(1.0, 1.0)),
  }
  rows = []
  for name, run in cases.items():
    load = common.loadavg()
    times = run()
    rows.append({"case": name, "median_s": common.median(times), "times_s": [round(t, 4) for t in times],
                 "loadavg_before": load})
    print(f"{name}: {rows[-1]['median_s']:.4f} s", flush=True)
  plain = rows[0]["median_s"]
  for row in rows:
    row["overhead_vs_plain"] = row["median_s"] / plain if row["case"] == "screen_only" else (
        row["median_s"] / plain - 1.0)
  notes = (f"Model `{args.model}`, K={k} clients, {args.steps} local steps of batch {args.batch}, ranks "
           f"uniform in [1, {args.r_max}], zero-padding aggregation. `screen_only` overhead is its time "
           "as a fraction of the plain round (the plain round already contains it); the others are "
           "relative extra time. Median of the calls after compilation.")
  common.write(args.out or f"screening_overhead_{args.model}", {"args": vars(args), "rows": rows},
               common.markdown_table(rows, ["case", "median_s", "overhead_vs_plain", "loadavg_before"]),
               notes)


if __name__ == "__main__":
  main()
