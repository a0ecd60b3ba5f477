"""Dense trainables: base parameters every client trains in full and the server averages.

Beside its LoRA factors a client may train some base parameters outright, e.g.
a classifier head the base checkpoint lacks (PEFT's ``modules_to_save``;
HeLoRA, Fan et al., ACM TOIT 2025, trains and averages its classifier so).
They are picked by a regex over the ``'/'``-joined parameter paths; the server
holds their global value ``w`` (a subtree of the base parameters), every
client of a round starts from it, and the round ends with the FedAvg of the
clients' copies, the same for every method::

    w <- sum_k p_k w_k,     p_k = n_k / sum_j n_j        (w kept when sum_j n_j = 0)

with the round's weights ``n_k`` (zero for an excluded upload, uniform under
client-level DP). The server, client, screening and DP code treat the pair
``(lora, dense)`` as the client's trainables; an empty ``dense`` (``{}``) is a
run without dense trainables.

Example:
  >>> import jax.numpy as jnp
  >>> params = {'body': {'kernel': jnp.ones((2, 2))},
  ...           'head': {'kernel': jnp.zeros((2, 3)), 'bias': jnp.zeros(3)}}
  >>> paths(select(params, r'^head/'))
  ['head/bias', 'head/kernel']
  >>> average({'w': jnp.array([[1.], [3.]])}, jnp.array([1., 3.]), {'w': jnp.zeros(1)})['w'].tolist()
  [2.5]
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from hetlora import aggregation

Params = Mapping[str, Any]


def select(params: Params, pattern: str) -> dict[str, Any]:
  """The subtree of ``params`` whose ``'/'``-joined leaf paths match ``pattern`` (``''``: none)."""
  if not pattern:
    return {}
  regex = re.compile(pattern)
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({p: x for p, x in flat.items() if regex.search(p)}, sep="/")


def paths(dense: Params) -> list[str]:
  """The sorted ``'/'``-joined leaf paths of ``dense``."""
  return sorted(traverse_util.flatten_dict(dense, sep="/"))


def overlay(params: Params, dense: Params) -> dict[str, Any]:
  """``params`` with the leaves of ``dense`` in place of their own (``dense``'s paths must exist)."""
  if not dense:
    return params
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  new = traverse_util.flatten_dict(dense, sep="/")
  missing = sorted(set(new) - set(flat))
  if missing:
    raise ValueError(f"dense trainables {missing} are not base parameters.")
  flat.update(new)
  return traverse_util.unflatten_dict(flat, sep="/")


def broadcast(dense: Params, num_clients: int) -> Any:
  """``dense`` stacked for ``num_clients`` clients: every leaf ``[K, ...]``."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), dense)


def average(stacked: Params, weights: jax.Array, current: Params) -> Any:
  """``sum_k p_k w_k`` with ``p_k = weights_k / sum weights`` (``current`` if they sum to zero).

  Args:
    stacked: the clients' copies, every leaf ``[K, ...]``.
    weights: ``float[K]``, e.g. examples times inclusion.
    current: the global value, returned where no client has weight.
  """
  total = jnp.sum(weights)
  mean = aggregation.weighted_sum(stacked, aggregation.example_weights(weights))
  return jax.tree.map(lambda new, old: jnp.where(total > 0, new, old).astype(old.dtype), mean, current)


def size(dense: Params) -> int:
  """Number of parameters in ``dense``."""
  return int(sum(x.size for x in jax.tree.leaves(dense)))
