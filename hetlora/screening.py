"""Screening the clients' uploads before aggregation: broken or hostile updates never count.

A client's update is the change of its factors over the round,
``Delta_k = (a_k - a_k^0, b_k - b_k^0)`` (trained minus received, both masked
to the client's rank), and its norm is taken on the factors::

    ||Delta_k|| = sqrt( sum_modules ||a_k - a_k^0||_F^2 + ||b_k - b_k^0||_F^2 )

(``r_max (d_in + d_out)`` numbers per module; never the ``d_in x d_out``
product). With dense trainables (:mod:`hetlora.dense`, e.g. a trained
classifier head ``w``) the update holds their change too, one norm over both::

    ||Delta_k|| = sqrt( ... + sum_dense ||w_k - w^0||_F^2 )

so a head that diverges excludes its upload, and clipping scales the head's
change with the factors'. An upload is **excluded** from the round when any of its numbers
(or its loss) is not finite, or when ``||Delta_k|| > max_norm``: it is
replaced by the factors the client received, gets no weight (``n_k = 0``:
every method gives a zero-example client no weight) and the client keeps
its rank. Optional **clipping** scales every included update to norm at most
``clip_norm``: ``Delta_k <- Delta_k min(1, clip_norm / ||Delta_k||)`` (the
clipping of DP-FedAvg, McMahan et al., ICLR 2018, applied to the factors).
The server counts and logs the exclusions of every round; with no update
left, the round keeps the server state (:func:`hetlora.server.make_round`).

Example:
  >>> import jax.numpy as jnp
  >>> start = {'q': {'a': jnp.zeros((2, 3, 1)), 'b': jnp.zeros((2, 1, 1))}}
  >>> trained = {'q': {'a': jnp.array([[[3.], [0.], [0.]], [[jnp.nan], [0.], [0.]]]),
  ...                  'b': jnp.array([[[4.]], [[0.]]])}}
  >>> norms, finite = update_norms(start, trained)
  >>> norms[0].item(), finite.tolist()
  (5.0, [True, False])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hetlora import lora as lora_lib

LoRA = lora_lib.LoRA


@dataclasses.dataclass(frozen=True)
class Screening:
  """How uploads are screened.

  Attributes:
    max_norm: exclude an update whose factor norm exceeds this
      (``config.server.max_update_norm``; ``0`` or ``None``: only non-finite
      updates are excluded).
    clip_norm: clip every included update to this factor norm
      (``config.client.clip_norm``; ``0`` or ``None``: no clipping).
  """
  max_norm: float | None = None
  clip_norm: float | None = None

  def __post_init__(self):
    for name, value in (("server.max_update_norm", self.max_norm), ("client.clip_norm", self.clip_norm)):
      if value is not None and value < 0:
        raise ValueError(f"{name}={value} must be >= 0 (0 turns it off).")


def update_norms(start: LoRA, trained: LoRA) -> tuple[jax.Array, jax.Array]:
  """``(||Delta_k||: float32[K], finite: bool[K])`` of stacked trees ``[K, ...]`` (any pytree of
  the client's trainables: the LoRA tree, or the pair ``(lora, dense)``)."""
  def per_client(x):
    return jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)

  deltas = jax.tree.map(jnp.subtract, trained, start)
  sq = sum(per_client(x) for x in jax.tree.leaves(deltas))
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
                              for x in jax.tree.leaves(trained)]), axis=0)
  return jnp.sqrt(jnp.where(finite, sq, 0.0)), finite


def screen(screening: Screening, start: LoRA, trained: LoRA, loss: jax.Array
           ) -> tuple[LoRA, jax.Array, jax.Array]:
  """Excludes and clips the cohort's uploads.

  Args:
    screening: the bounds.
    start: what each client received, stacked ``[K, ...]``: the factors, or the pair
      ``(factors, dense trainables)``.
    trained: the uploads, stacked ``[K, ...]``, of the same structure.
    loss: ``float32[K]`` the clients' mean local losses (a non-finite loss excludes).

  Returns:
    ``(uploads, included bool[K], norms float32[K])``: excluded clients' uploads
    are their ``start``; included ones are clipped if ``clip_norm`` is set;
    ``norms`` are the norms before clipping (0 where not finite).
  """
  norms, finite = update_norms(start, trained)
  included = finite & jnp.isfinite(loss)
  if screening.max_norm:
    included &= norms <= screening.max_norm
  factor = None
  if screening.clip_norm:
    factor = jnp.minimum(1.0, screening.clip_norm / jnp.maximum(norms, 1e-30))

  def one(s, t):
    keep = included.reshape((-1,) + (1,) * (t.ndim - 1))
    if factor is not None:
      t = s + (t - s) * factor.reshape(keep.shape).astype(t.dtype)
    return jnp.where(keep, t, s)

  return jax.tree.map(one, start, trained), included, norms
