"""FlexLoRA: aggregate full updates, redistribute by truncated SVD.

Bai, Chen, Zhao, Li, Xie, Li, Ding, Zhou. Federated Fine-tuning of Large
Language Models under Heterogeneous Tasks and Client Resources. NeurIPS 2024
(arXiv 2402.11505), Sec. 3 ("FlexLoRA"). The server forms the weighted full
update and gives client ``k`` its best rank-``r_k`` approximation::

    dW = sum_k p_k s_k a_k diag(m_k) b_k  = U S V^T,       p_k = n_k / sum_j n_j
    client k:  a_k = U[:, :r_k],   b_k = S[:r_k] V[:, :r_k]^T / s_k

(all singular values on the output-side factor, as the authors' code puts
them on their ``B``; ``s_k`` the client's own scale, so ``s_k a_k b_k`` is
the rank-``r_k`` truncation of ``dW``). The SVD is computed without forming
the ``[d_in, d_out]`` matrix: with ``A = [sqrt(p_k s_k) a_k diag(m_k)]_k:
[d_in, R]`` and ``B = [sqrt(p_k s_k) diag(m_k) b_k]_k: [R, d_out]``
(``K r_max`` columns, of which only ``R = sum_k r_k`` are not masked to zero),
``dW = A B``; reduced QRs ``A = Q_a R_a``, ``B^T = Q_b R_b`` and the SVD of the
small core ``R_a R_b^T = U_c S V_c^T`` give ``U = Q_a U_c`` and
``S V^T = U^T A B`` (:func:`top_factors`).
With ``core_rank`` (a static bound on ``R``, e.g. :func:`core_rank_bound` of
the run's client ranks) the unmasked columns are first gathered to the front
(:func:`compact`), so the QRs are ``[d, core_rank]`` and the core
``[core_rank, core_rank]``: the cost falls with the clients' actual ranks, not
with ``K r_max``. A cohort whose ``R`` exceeds the bound takes the full
``K r_max`` path (a ``lax.cond``), so the bound affects speed only: both paths
give the same factors up to float rounding.

Truncations of one SVD are nested, so the server holds only the rank-``r_max``
factors ``a = U[:, :r_max]``, ``b = S[:r_max] V[:, :r_max]^T``: **scale 1**
(the global update is ``a b``, not ``s a b``), and :func:`distribute`
truncates to ``r_k`` and divides ``b`` by ``s_k``. Base weights are never
merged.

Scale: any rule; ``scales`` must be each client's actual ``s_k`` (the paper
uses ``alpha / r_k``; the reference code hard-codes ``alpha = 16``, we do not).

The run derives ``core_rank`` from its client ranks (:func:`run_options`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora.methods import base
from hetlora.methods import flora

LoRA = lora_lib.LoRA


def top_factors(a: jax.Array, b: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """The top-``r`` SVD factors of ``a @ b`` without forming it.

  With ``a @ b = U S V^T``: reduced QRs ``a = Q_a R_a`` and ``b^T = Q_b R_b``
  (only ``R_b`` is formed), the SVD of the core ``R_a R_b^T = U_c S V_c^T``,
  then ``U_r = Q_a U_c[:, :r]`` and ``S_r V_r^T = U_r^T a b`` (a projection:
  no division by singular values). When ``R >= min(d_in, d_out)`` the QR route
  saves nothing, and the product is formed and decomposed directly (a static,
  shape-based choice).

  Args:
    a: ``[d_in, R]``; b: ``[R, d_out]``; r: how many triplets (static).

  Returns:
    ``U_r: [d_in, r]`` (orthonormal columns) and ``S_r V_r^T: [r, d_out]``,
    zero-padded when ``min(d_in, d_out, R) < r``; ``U_r @ (S_r V_r^T)`` is the
    best rank-``r`` approximation of ``a @ b``.

  Example:
    >>> u, svt = top_factors(jnp.eye(3, 2), 2 * jnp.eye(2, 4), 2)
    >>> jnp.linalg.norm(svt, axis=1).tolist()
    [2.0, 2.0]
  """
  (d_in, width), d_out = a.shape, b.shape[1]
  q = min(r, d_in, d_out, width)
  if width >= min(d_in, d_out):  # the core is no smaller than dW: SVD dW itself
    u, s, vt = jnp.linalg.svd(a @ b, full_matrices=False)
    u, svt = u[:, :q], s[:q, None] * vt[:q]
  else:
    q_a, r_a = jnp.linalg.qr(a)                   # [d_in, R], [R, R]
    r_b = jnp.linalg.qr(b.T, mode="r")            # [R, R]
    u_c = jnp.linalg.svd(r_a @ r_b.T, full_matrices=False)[0]
    u = q_a @ u_c[:, :q]
    svt = (u.T @ a) @ b
  return jnp.pad(u, ((0, 0), (0, r - q))), jnp.pad(svt, ((0, r - q), (0, 0)))


def core_rank_bound(client_ranks, cohort_size: int, r_max: int) -> int:
  """The largest ``sum_k min(r_k, r_max)`` any cohort of ``cohort_size`` clients can have.

  Args:
    client_ranks: ``int[N]`` every client's rank (host values).
    cohort_size: clients per round ``K``; r_max: the adapter width.

  Example:
    >>> core_rank_bound([1, 8, 4, 64], cohort_size=2, r_max=32)
    40
  """
  ranks = np.minimum(np.sort(np.asarray(client_ranks, np.int64))[::-1][:cohort_size], r_max)
  return int(ranks.sum())


def compact(a: jax.Array, b: jax.Array, active: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Gathers the active rank columns of stacked factors to the front.

  Args:
    a: ``[d_in, C]``; b: ``[C, d_out]``; active: ``bool[C]`` (inactive columns of
      ``a`` and rows of ``b`` are zero); width: the static output width, ``<= C``.

  Returns:
    ``a[:, idx]: [d_in, width]`` and ``b[idx]: [width, d_out]`` where ``idx``
    lists the active columns first, in order. ``a @ b`` is unchanged when at
    most ``width`` columns are active.
  """
  idx = jnp.argsort(~active, stable=True)[:width]
  return jnp.take(a, idx, axis=1), jnp.take(b, idx, axis=0)


@functools.partial(jax.jit, static_argnames=("core_rank",))
def aggregate(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array,
             core_rank: int | None = None) -> LoRA:
  """Rank-``r_max`` SVD factors of ``dW = sum_k p_k s_k a_k diag(m_k) b_k``.

  Args:
    lora: stacked tree ``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``.
    ranks: ``int32[K]``; num_examples: ``float[K]``; scales: ``float[K]``
      (``s_k >= 0``, each client's own scale).
    core_rank: optional static bound on ``R = sum_k r_k`` over the clients with
      examples; when given (and below ``K r_max``) the SVD works on ``R`` columns
      instead of ``K r_max``. Any value gives the same factors up to rounding.

  Returns:
    ``a = U[:, :r_max]: [d_in, r_max]``, ``b = S V^T[:r_max]: [r_max, d_out]``,
    scale 1 (zero-padded if ``min(d_in, d_out) < r_max``).
  """
  aggregation.check_inputs(lora, ranks, num_examples, scales)
  if core_rank is not None and core_rank < 1:
    raise ValueError(f"method.kwargs.core_rank={core_rank} must be a positive bound on the sum of "
                     "client ranks; leave it unset to derive it from the run.")
  r_max = lora_lib.r_max_of(lora)
  w = jnp.sqrt(aggregation.example_weights(num_examples) * scales.astype(jnp.float32))
  active = ((lora_lib.rank_mask(ranks, r_max) > 0) & (w[:, None] > 0)).reshape(-1)   # [K r_max]

  def one(mod):
    a, b = flora.stacked_factors(mod, ranks, w, w)
    if core_rank is None or core_rank >= a.shape[1]:
      u, svt = top_factors(a, b, r_max)
    else:
      u, svt = jax.lax.cond(jnp.sum(active) <= core_rank,
                            lambda: top_factors(*compact(a, b, active, core_rank), r_max),
                            lambda: top_factors(a, b, r_max))
    return {"a": u.astype(mod["a"].dtype), "b": svt.astype(mod["b"].dtype)}

  return lora_lib.map_modules(one, lora)


def distribute(global_lora: LoRA, ranks: jax.Array, scales: jax.Array) -> LoRA:
  """Client factors ``a_k = U[:, :r_k]``, ``b_k = S V^T[:r_k] / s_k``: stacked ``[K, ...]``.

  Args:
    global_lora: the server's scale-1 tree from :func:`flexlora`.
    ranks: ``int32[K]``; scales: ``float[K]`` the clients' scales (``> 0``).
  """
  inv = 1.0 / scales
  return lora_lib.map_modules(
      lambda mod: {"a": mod["a"], "b": mod["b"] * inv[:, None, None].astype(mod["b"].dtype)},
      lora_lib.truncate(global_lora, ranks))


def fold_unit_scale(state: LoRA, alpha: float, rule: str) -> LoRA:
  """One model, ``[1, ...]``: the server adapter is scale 1, ``dW = a b``."""
  del alpha, rule
  r_max = lora_lib.r_max_of(state)
  return jax.tree.map(lambda x: x[None], lora_lib.fold_scale(state, jnp.int32(r_max), 1.0))


def make(core_rank: int | None = None) -> base.Method:
  """FlexLoRA; ``core_rank``: static bound on the cohort's summed ranks (speed only)."""
  return base.Method(
      name="flexlora", aggregate=functools.partial(aggregate, core_rank=core_rank),
      distribute=lambda state, ranks, scales, key: distribute(state, ranks, scales),
      global_adapters=fold_unit_scale)


def run_options(run: base.Run) -> dict:
  """The SVD works on the cohort's actual ranks: ``core_rank`` from the run's client ranks."""
  return {"core_rank": core_rank_bound(run.client_ranks, run.clients_per_round, run.r_max)}
