"""FlexLoRA's SVD: factored (QR + small core SVD) vs dense SVD of ``dW``.

For one kernel ``[d, d]`` and ``K`` clients of width ``r_max`` the factored
form works on ``A: [d, R]``, ``B: [R, d]`` with ``R = K r_max``
(:func:`hetlora.flexlora.svd_of_product`); the dense baseline forms
``dW = A B`` and runs ``jnp.linalg.svd``. Both keep the top ``r_max``
triplets. The factored path wins only when ``R < d``: its core is
``[min(d, R), min(d, R)]``, so at ``R = d`` there is nothing to save.

Usage::

    python benchmarks/flexlora_svd.py [--out results/flexlora_svd.json] [--repeats 3]
    python benchmarks/flexlora_svd.py --config 1024,16,64 --config 4096,8,64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from hetlora import flexlora

DEFAULT_CONFIGS = ("1024,16,64", "1024,4,64", "2048,8,64")


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))            # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run(d: int, k: int, r_max: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  a = jnp.float32(rng.normal(size=(d, k * r_max)) / np.sqrt(d))
  b = jnp.float32(rng.normal(size=(k * r_max, d)) / np.sqrt(k * r_max))

  @jax.jit
  def factored(a, b):
    u, s, vt = flexlora.svd_of_product(a, b)
    return u[:, :r_max], s[:r_max], vt[:r_max]

  @jax.jit
  def dense(a, b):
    u, s, vt = jnp.linalg.svd(a @ b, full_matrices=False)
    return u[:, :r_max], s[:r_max], vt[:r_max]

  uf, sf, vf = factored(a, b)
  ud, sd, vd = dense(a, b)
  approx = lambda u, s, vt: np.asarray((u * s) @ vt, np.float64)
  t_f, t_d = _time(factored, a, b, repeats=repeats), _time(dense, a, b, repeats=repeats)
  return {"d": d, "K": k, "r_max": r_max, "R": k * r_max,
          "dense_s": t_d, "factored_s": t_f, "speedup": t_d / t_f,
          "rel_diff_rank_r_max": float(np.linalg.norm(approx(uf, sf, vf) - approx(ud, sd, vd))
                                       / np.linalg.norm(approx(ud, sd, vd)))}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", action="append", help="d,K,r_max (repeatable)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="results/flexlora_svd.json")
  args = p.parse_args()
  rows = [run(*map(int, c.split(",")), repeats=args.repeats) for c in (args.config or DEFAULT_CONFIGS)]
  print(f"{'d':>6} {'K':>4} {'r_max':>6} {'R':>6} {'dense s':>10} {'factored s':>11} {'speedup':>8} {'rel diff':>9}")
  for r in rows:
    print(f"{r['d']:>6} {r['K']:>4} {r['r_max']:>6} {r['R']:>6} {r['dense_s']:>10.4f} "
          f"{r['factored_s']:>11.4f} {r['speedup']:>7.1f}x {r['rel_diff_rank_r_max']:>9.1e}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
          "machine": platform.processor() or platform.machine(), "jax": jax.__version__}
  out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
