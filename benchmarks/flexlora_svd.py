"""FlexLoRA's SVD: the aggregator (QR + small core SVD) vs a dense SVD of ``dW``.

One adapted ``[d, d]`` kernel, ``K`` clients of width ``r_max`` with ranks
from :func:`hetlora.ranks.assign`: a distribution of :data:`hetlora.ranks.DISTRIBUTIONS`
over ``1..r_max``, or with the suffix ``_pow2`` over ``{1, 2, 4, ..., r_max}``
(``constant``: every client at ``r_max``); random factors, example counts
uniform in [10, 200], scales ``alpha / r_k``. Timed,
each the median of ``--repeats`` calls after compilation:

- ``dense``: forms ``dW = sum_k p_k s_k a_k b_k`` (``[d, d]``) and runs
  ``jnp.linalg.svd`` on it, keeping the top ``r_max`` triplets: the baseline.
- ``stacked``: :func:`hetlora.methods.flexlora.aggregate` without ``core_rank``: QRs of
  all ``K r_max`` stacked columns (the dense SVD when ``K r_max >= d``).
- ``compact``: the same with ``core_rank = R = sum_k r_k``, the cohort's
  actual ranks: QRs of ``[d, R]``, an ``[R, R]`` core.

``rel_diff`` compares each rank-``r_max`` product with the dense one. Nothing
can be saved when ``R >= d``: the core is then as large as ``dW``.

Usage::

    python benchmarks/flexlora_svd.py
    python benchmarks/flexlora_svd.py --config 1024,16,64,uniform_pow2 --config 4096,8,64,constant
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import common
from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora import ranks as ranks_lib
from hetlora.methods import flexlora
from hetlora.methods import flora

DEFAULT_CONFIGS = ("1024,16,64,heavy_tail_pow2", "1024,16,64,uniform_pow2", "1024,16,64,normal_pow2",
                   "1024,16,64,uniform", "1024,16,64,constant", "1024,4,64,constant",
                   "2048,16,64,uniform")


def client_ranks(k: int, r_max: int, mix: str) -> np.ndarray:
  """``int32[K]`` ranks: ``mix`` is a distribution name, optionally with ``_pow2``."""
  distribution = mix.removesuffix("_pow2")
  choices = tuple(2 ** i for i in range(int(np.log2(r_max)) + 1)) if mix.endswith("_pow2") else ()
  return ranks_lib.assign(k, 0, 1, r_max, choices, distribution).astype(np.int32)


@jax.jit
def dense(lora, ranks, num_examples, scales):
  """Top-``r_max`` factors from the SVD of the formed ``[d_in, d_out]`` update."""
  r_max = lora_lib.r_max_of(lora)
  w = jnp.sqrt(aggregation.example_weights(num_examples) * scales)
  mod = lora["q"]
  u, s, vt = jnp.linalg.svd(jnp.matmul(*flora.stacked_factors(mod, ranks, w, w)), full_matrices=False)
  return {"q": {"a": u[:, :r_max], "b": s[:r_max, None] * vt[:r_max]}}


def run(d: int, k: int, r_max: int, mix: str, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  ranks = client_ranks(k, r_max, mix)
  m = lora_lib.rank_mask(ranks, r_max)
  lora = {"q": {"a": jnp.float32(rng.normal(size=(k, d, r_max)) / np.sqrt(d)) * m[:, None, :],
                "b": jnp.float32(rng.normal(size=(k, r_max, d)) / np.sqrt(r_max)) * m[:, :, None]}}
  args = (lora, jnp.asarray(ranks), jnp.float32(rng.integers(10, 201, size=k)),
          lora_lib.scale(jnp.asarray(ranks), 2.0 * r_max, "alpha/r", r_max))
  core = int(ranks.sum())
  fns = {"dense": dense, "stacked": flexlora.aggregate,
         "compact": lambda *a: flexlora.aggregate(*a, core_rank=core)}
  product = lambda out: np.asarray(out["q"]["a"], np.float64) @ np.asarray(out["q"]["b"], np.float64)
  outs = {name: common.block(fn(*args)) for name, fn in fns.items()}       # compile + warm up
  secs = {name: common.median(common.time_calls(lambda fn=fn: fn(*args), repeats))
          for name, fn in fns.items()}
  ref = product(outs["dense"])
  row = {"d": d, "K": k, "r_max": r_max, "ranks": mix, "R": core, "K_r_max": k * r_max}
  for name in fns:
    row[f"{name}_s"] = secs[name]
  row["speedup_stacked"] = secs["dense"] / secs["stacked"]
  row["speedup_compact"] = secs["dense"] / secs["compact"]
  row["rel_diff_stacked"] = float(np.linalg.norm(product(outs["stacked"]) - ref) / np.linalg.norm(ref))
  row["rel_diff_compact"] = float(np.linalg.norm(product(outs["compact"]) - ref) / np.linalg.norm(ref))
  row["loadavg"] = common.loadavg()
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", action="append",
                 help="d,K,r_max,ranks (repeatable); ranks: a distribution, optionally + '_pow2'")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  rows = []
  for c in args.config or DEFAULT_CONFIGS:
    d, k, r_max, mix = c.split(",")
    rows.append(run(int(d), int(k), int(r_max), mix, args.repeats))
    print(rows[-1], flush=True)
  columns = ["d", "K", "r_max", "ranks", "R", "K_r_max", "dense_s", "stacked_s", "compact_s",
             "speedup_stacked", "speedup_compact", "rel_diff_compact", "loadavg"]
  common.write("flexlora_svd", {"rows": rows}, common.markdown_table(rows, columns),
               f"One [d, d] kernel, K clients, float32, {jax.default_backend()}; median of "
               f"{args.repeats} calls after compilation. R = sum of client ranks.")


if __name__ == "__main__":
  main()
