"""Every federated LoRA method as one small container the server can run.

A :class:`Method` bundles what differs between methods:

- ``init_global(global_lora, client_ranks) -> state_lora``: what the server stores (usually
  the rank-``r_max`` adapter; rank groups for HeLoRA-KD; zeros for FLoRA,
  whose updates live in the merged base);
- ``distribute(state_lora, ranks, scales, key) -> lora [K, ...]``: the
  clients' starting factors;
- ``trainable``: ``'ab'`` or ``'b'`` (``a`` frozen, FFA-LoRA);
- ``aggregate(lora [K], ranks, num_examples, scales)``: the round's reduction;
- ``server_update(previous, aggregated, ranks, base_params, public) ->
  state_lora`` (default: the aggregate);
- ``merges_into_base``: the aggregate is a scale-1 stacked tree whose product
  the server adds to ``ServerState.base_delta`` (FLoRA);
- ``resets_clients``: clients start every round from a fresh random LoRA, so
  the round needs a ``key``;
- ``fold_global(state_lora, alpha, rule) -> lora_eff``: the tree a model
  consumes to evaluate the server's adapter at ``r_max``.

Methods and papers:

- ``'fedavg'`` / ``'homlora'``: FedAvg of factors (FedIT; Zhang et al., ICASSP 2024).
- ``'zero_pad'``, ``'hetlora'``: Cho et al., EMNLP 2024 (arXiv 2401.06432),
  see :mod:`hetlora.aggregation`.
- ``'helora_pad'``, ``'helora_kd'``: Fan et al., ACM TOIT 25(2) 2025
  (doi 10.1145/3723877), :mod:`hetlora.helora_pad`, :mod:`hetlora.helora_kd`.
- ``'flexlora'``: Bai et al., NeurIPS 2024 (arXiv 2402.11505), :mod:`hetlora.flexlora`.
- ``'flora'``: Wang et al., NeurIPS 2024 (arXiv 2409.05976), :mod:`hetlora.flora`.
- ``'ffa_lora'``: Sun, Li, Li, Ding. Improving LoRA in Privacy-preserving
  Federated Learning. ICLR 2024 (arXiv 2403.12313). ``a`` is frozen at the
  shared random initialisation for the whole run, only ``b`` is trained and
  averaged: ``b = sum_k p_k b_k``, ``a`` unchanged, so ``s a b = sum_k p_k s a b_k``
  exactly (equal ranks, one scale). Scale: any rule, equal ranks.

Example:
  >>> m = get_method('helora_pad', padding='mean')
  >>> m.name, m.trainable
  ('helora_pad', 'ab')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from hetlora import aggregation
from hetlora import flexlora
from hetlora import flora
from hetlora import helora_kd
from hetlora import helora_pad
from hetlora import lora as lora_lib

LoRA = lora_lib.LoRA


def _truncate(state_lora: LoRA, ranks: jax.Array, scales: jax.Array, key: jax.Array) -> LoRA:
  """Distribution by truncation (HetLoRA Sec. 3.1); ``scales`` and ``key`` unused."""
  return lora_lib.truncate(state_lora, ranks)


def _keep_aggregate(previous, aggregated, ranks, base_params, public):
  return aggregated


def _fold_rule(state_lora: LoRA, alpha: float, rule: str) -> LoRA:
  """``fold_scale`` at rank ``r_max`` with the run's scale rule."""
  r_max = lora_lib.r_max_of(state_lora)
  return lora_lib.fold_scale(state_lora, jnp.int32(r_max), lora_lib.scale(r_max, alpha, rule, r_max))


@dataclasses.dataclass(frozen=True)
class Method:
  """One federated LoRA method (see the module docstring for each field)."""
  name: str
  aggregate: Callable[..., Any]
  distribute: Callable[[LoRA, jax.Array, jax.Array, jax.Array], LoRA] = _truncate
  trainable: str = "ab"
  resets_clients: bool = False
  merges_into_base: bool = False
  init_global: Callable[[LoRA, Any], LoRA] = lambda global_lora, client_ranks: global_lora
  server_update: Callable[..., LoRA] = _keep_aggregate
  fold_global: Callable[[LoRA, float, str], LoRA] = _fold_rule


def _ffa_keep_a(previous: LoRA, aggregated: LoRA, ranks, base_params, public) -> LoRA:
  """FFA-LoRA: the server's ``a`` never changes; ``b`` is the clients' average."""
  return lora_lib.map_modules(lambda old, new: {"a": old["a"], "b": new["b"]}, previous, aggregated)


def _flora_zeros(previous: LoRA, aggregated, ranks, base_params, public) -> LoRA:
  """FLoRA: after merging into the base nothing is left in the adapter."""
  return jax.tree.map(jnp.zeros_like, previous)


def _flora_fresh(state_lora, ranks, scales, key):
  return flora.fresh(key, state_lora, ranks)


def _flexlora_distribute(state_lora, ranks, scales, key):
  return flexlora.distribute(state_lora, ranks, scales)


def _flexlora_fold(state_lora: LoRA, alpha: float, rule: str) -> LoRA:
  """The FlexLoRA server adapter is scale 1: ``dW = a b``."""
  return lora_lib.fold_scale(state_lora, jnp.int32(lora_lib.r_max_of(state_lora)), 1.0)


def _helora_kd(group_ranks: Sequence[int], logits_fn: helora_kd.LogitsFn, alpha: float,
               scale_rule: str = "alpha/r", **options) -> Method:
  if len(group_ranks) == 0 or sorted(set(group_ranks)) != list(group_ranks):
    raise ValueError(f"method.group_ranks must be distinct ranks in ascending order, got {group_ranks}.")
  spec = helora_kd.KDSpec(logits_fn=logits_fn, alpha=alpha, scale_rule=scale_rule, **options)
  groups = jnp.asarray(group_ranks, jnp.int32)

  def init_global(global_lora, client_ranks):
    missing = sorted(set(map(int, client_ranks)) - set(group_ranks))
    if missing:
      raise ValueError(f"HeLoRA-KD: client ranks {missing} are not in method.group_ranks={tuple(group_ranks)}.")
    return helora_kd.init_groups(global_lora, groups)

  def distribute(state_lora, ranks, scales, key):
    return helora_kd.distribute(state_lora, ranks, groups)

  def aggregate(lora, ranks, num_examples, scales):
    return helora_kd.aggregate(lora, ranks, num_examples, groups)

  def server_update(previous, aggregated, ranks, base_params, public):
    return helora_kd.server_update(spec, groups, previous, *aggregated, base_params, public)

  def fold_global(state_lora, alpha_, rule):
    s = lora_lib.scale(groups, alpha_, rule, lora_lib.r_max_of(state_lora))
    return jax.vmap(lora_lib.fold_scale)(state_lora, groups, s)

  return Method("helora_kd", aggregate, distribute, init_global=init_global,
                server_update=server_update, fold_global=fold_global)


_BUILDERS: dict[str, Callable[..., Method]] = {
    "fedavg": lambda: Method("fedavg", aggregation.fedavg),
    "homlora": lambda: Method("homlora", aggregation.fedavg),
    "zero_pad": lambda: Method("zero_pad", aggregation.zero_pad),
    "hetlora": lambda **kw: Method("hetlora", aggregation.get("hetlora", **kw)),
    "helora_pad": lambda **kw: Method("helora_pad", functools.partial(helora_pad.helora_pad, **kw)),
    "flexlora": lambda core_rank=None: Method(
        "flexlora", functools.partial(flexlora.flexlora, core_rank=core_rank), _flexlora_distribute,
        fold_global=_flexlora_fold),
    "flora": lambda: Method("flora", flora.stack, _flora_fresh, resets_clients=True,
                            merges_into_base=True, init_global=lambda g, r: jax.tree.map(jnp.zeros_like, g),
                            server_update=_flora_zeros),
    "ffa_lora": lambda: Method("ffa_lora", aggregation.fedavg, trainable="b", server_update=_ffa_keep_a),
    "helora_kd": _helora_kd,
}


def names() -> list[str]:
  return sorted(_BUILDERS)


def get_method(name: str, **kwargs) -> Method:
  """The method ``name`` with its options bound.

  Options: ``hetlora(per_module, use_num_examples)``, ``helora_pad(padding,
  weighting)``, ``flexlora(core_rank)``, ``helora_kd(group_ranks, logits_fn,
  alpha, scale_rule, temperature, epochs, ce_weight, learning_rate,
  weight_decay)``; the others take none.

  >>> get_method('flora').merges_into_base
  True
  """
  if name not in _BUILDERS:
    raise ValueError(f"method.name {name!r} is unknown; choose one of {names()}.")
  try:
    return _BUILDERS[name](**kwargs)
  except TypeError as e:
    raise TypeError(f"method {name!r}: bad options {sorted(kwargs)}: {e}") from None
