"""HeLoRA-KD: one global model per rank group, deep mutual learning on public data.

Fan, Su, Tarkoma, Hui. HeLoRA: LoRA-heterogeneous Federated Fine-tuning for
Foundation Models. ACM Transactions on Internet Technology 25(2), 2025
(doi 10.1145/3723877), the knowledge-distillation variant. Structures stay
heterogeneous: the server holds one adapter per distinct rank ``g_1 < ... <
g_G`` (stacked ``a: [G, d_in, r_max]``, group ``i`` masked to rank ``g_i``).
A round:

1. client ``k`` receives its group's adapter (its rank ``r_k`` must be a group rank);
2. clients train (all groups in the same vmapped call: equal shapes);
3. within group ``i``: ``a_i = sum_{k: r_k = g_i} p_k a_k`` (``p`` by example
   count within the group; a group with no client this round keeps its model);
4. deep mutual learning on a public set: per batch, with
   ``z_i = logits(base, adapter_i)`` and the teacher ``t = stop_grad(mean_i z_i)``,
   every group minimises::

       L_i = T^2 * KL(softmax(t / T) || softmax(z_i / T)) + ce_weight * CE(z_i, y)

   averaged over the real examples; all groups take one vmapped AdamW step
   per batch (lr ``5e-5``, 10 epochs and ``T = 1``, ``ce_weight = 0`` in the
   authors' setting; a fresh optimizer each round).

Scale: group ``i`` uses the run's rule at its own rank ``g_i`` for the
distillation forward pass; aggregation averages factors as they are.
The model enters through ``logits_fn(base_params, lora_eff, batch) -> [B, C]``
(``lora_eff`` as from :func:`hetlora.lora.fold_scale`). Rank groups are fixed
for the run (every client rank must be a group rank; self-pruning is
HetLoRA's and does not apply here). The run supplies the groups (its distinct
client ranks), the model's logits and the scale (:func:`run_options`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora.methods import base

LoRA = lora_lib.LoRA
LogitsFn = Callable[[Any, LoRA, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class KDSpec:
  """Deep-mutual-learning options (defaults: the authors' code, AdamW at torch's default decay)."""
  logits_fn: LogitsFn
  alpha: float
  scale_rule: str = "alpha/r"
  temperature: float = 1.0
  epochs: int = 10
  ce_weight: float = 0.0
  learning_rate: float = 5e-5
  weight_decay: float = 0.01

  def __post_init__(self):
    if self.temperature <= 0:
      raise ValueError(f"method.kwargs.temperature={self.temperature} must be > 0 (the authors use 1).")
    if self.epochs < 0:
      raise ValueError(f"method.kwargs.epochs={self.epochs} must be >= 0 (the authors use 10).")


def group_index(ranks: jax.Array, group_ranks: jax.Array) -> jax.Array:
  """``int32[K]``: the group whose rank equals ``ranks[k]`` (``group_ranks: int32[G]``)."""
  return jnp.argmax(ranks[:, None] == group_ranks[None, :], axis=1).astype(jnp.int32)


def init_groups(global_lora: LoRA, group_ranks: jax.Array) -> LoRA:
  """One copy of ``global_lora`` per group, masked to its rank: ``a: [G, d_in, r_max]``."""
  return lora_lib.truncate(global_lora, group_ranks)


def distribute(group_lora: LoRA, ranks: jax.Array, group_ranks: jax.Array) -> LoRA:
  """Client ``k`` gets its group's adapter: stacked ``[K, ...]``, masked to ``ranks[k]``."""
  idx = group_index(ranks, group_ranks)
  return jax.vmap(lora_lib.mask)(jax.tree.map(lambda x: x[idx], group_lora), ranks)


def aggregate(lora: LoRA, ranks: jax.Array, num_examples: jax.Array,
              group_ranks: jax.Array) -> tuple[LoRA, jax.Array]:
  """Example-weighted FedAvg within each rank group.

  Args:
    lora: stacked client tree ``a: [K, d_in, r_max]``.
    ranks: ``int32[K]``; num_examples: ``float[K]``; group_ranks: ``int32[G]``.

  Returns:
    ``(group_lora [G, ...], present bool[G])``; a group with no client is zero
    and not ``present``.
  """
  member = (ranks[None, :] == group_ranks[:, None]).astype(jnp.float32)     # [G, K]
  w = member * jnp.asarray(num_examples, jnp.float32)[None, :]
  total = jnp.sum(w, axis=1, keepdims=True)
  w = w / jnp.where(total > 0, total, 1.0)
  padded = aggregation.masked(lora, ranks)
  return jax.vmap(lambda wg: aggregation.weighted_sum(padded, wg))(w), total[:, 0] > 0


def kd_loss(logits: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """``T^2 KL(softmax(teacher/T) || softmax(logits/T))`` per example: ``[B, C] -> [B]``."""
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
  return temperature**2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distill(spec: KDSpec, base_params: Any, group_lora: LoRA, group_ranks: jax.Array,
            public: Mapping[str, Any]) -> tuple[LoRA, jax.Array]:
  """Deep mutual learning of all groups, one vmapped AdamW step per public batch.

  Args:
    spec: distillation options and the model's ``logits_fn``.
    base_params: the base weights (shared by all groups).
    group_lora: stacked ``a: [G, d_in, r_max]``.
    group_ranks: ``int32[G]``.
    public: ``{'batch': tree of [steps, B, ...], 'mask': float[steps, B]}``
      (``batch['label']`` needed when ``ce_weight > 0``).

  Returns:
    ``(group_lora, losses float32[epochs, G])``: the distilled adapters and each
    group's mean loss per epoch, measured before each step.
  """
  r_max = lora_lib.r_max_of(group_lora)
  scales = lora_lib.scale(group_ranks, spec.alpha, spec.scale_rule, r_max)
  opt = optax.adamw(spec.learning_rate, weight_decay=spec.weight_decay)

  def objective(params, batch, mask):
    logits = jax.vmap(lambda l, r, s: spec.logits_fn(base_params, lora_lib.fold_scale(l, r, s), batch))(
        params, group_ranks, scales).astype(jnp.float32)                       # [G, B, C]
    teacher = jax.lax.stop_gradient(jnp.mean(logits, axis=0))
    per = jax.vmap(kd_loss, in_axes=(0, None, None))(logits, teacher, spec.temperature)
    if spec.ce_weight:
      per = per + spec.ce_weight * optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"][None])
    per_group = jnp.sum(per * mask, axis=-1) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(per_group), per_group

  def step(carry, xs):
    params, opt_state = carry
    batch, mask = xs
    (_, per_group), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, mask)
    updates, new_state = jax.vmap(opt.update)(grads, opt_state, params)
    new_params = jax.vmap(lora_lib.mask)(optax.apply_updates(params, updates), group_ranks)
    n = jnp.sum(mask)
    keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(n > 0, x, y), new, old)
    return (keep(new_params, params), keep(new_state, opt_state)), (per_group * n, n)

  def epoch(carry, _):
    carry, (sums, counts) = jax.lax.scan(step, carry, (public["batch"], public["mask"]))
    return carry, jnp.sum(sums, axis=0) / jnp.maximum(jnp.sum(counts), 1.0)

  (group_lora, _), losses = jax.lax.scan(
      epoch, (group_lora, jax.vmap(opt.init)(group_lora)), None, length=spec.epochs)
  return group_lora, losses


def server_update(spec: KDSpec, group_ranks: jax.Array, previous: LoRA, aggregated: LoRA,
                  present: jax.Array, base_params: Any, public: Mapping[str, Any]) -> LoRA:
  """Step 3's result with absent groups kept from ``previous``, then :func:`distill`."""
  if public is None:
    raise ValueError("HeLoRA-KD needs the public set: call round_fn(..., public={'batch', 'mask'}).")
  merged = jax.tree.map(
      lambda new, old: jnp.where(present.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
      aggregated, previous)
  return distill(spec, base_params, merged, group_ranks, public)[0]


def check_group_ranks(group_ranks) -> None:
  """Refuses group ranks that are not distinct and ascending."""
  if len(group_ranks) == 0 or sorted(set(group_ranks)) != list(group_ranks):
    raise ValueError(f"method.kwargs.group_ranks={tuple(group_ranks)} must be distinct ranks in "
                     "ascending order, e.g. (2, 4, 8).")


def make(group_ranks: tuple[int, ...] = (), logits_fn: LogitsFn | None = None, alpha: float = 1.0,
         scale_rule: str = "alpha/r", temperature: float = 1.0, epochs: int = 10,
         ce_weight: float = 0.0, learning_rate: float = 5e-5,
         weight_decay: float = 0.01) -> base.Method:
  """HeLoRA-KD over the rank groups ``group_ranks`` (see :class:`KDSpec` for the rest)."""
  group_ranks = tuple(int(g) for g in group_ranks)
  check_group_ranks(group_ranks)
  if logits_fn is None:
    raise ValueError("method 'helora_kd' distils class logits: the model must give them "
                     "(model.kind='bert_classifier'), or choose another method.name.")
  spec = KDSpec(logits_fn=logits_fn, alpha=alpha, scale_rule=scale_rule, temperature=temperature,
                epochs=epochs, ce_weight=ce_weight, learning_rate=learning_rate,
                weight_decay=weight_decay)
  groups = jnp.asarray(group_ranks, jnp.int32)

  def check_ranks(client_ranks, r_max):
    if max(group_ranks) > r_max:
      raise ValueError(f"method.kwargs.group_ranks={group_ranks} exceed lora.r_max={r_max}.")
    missing = sorted(set(map(int, client_ranks)) - set(group_ranks))
    if missing:
      raise ValueError(f"method 'helora_kd': client ranks {missing} are not in "
                       f"method.kwargs.group_ranks={group_ranks}; every client rank must be a group rank.")

  def fold(state, alpha_, rule):
    s = lora_lib.scale(groups, alpha_, rule, lora_lib.r_max_of(state))
    return jax.vmap(lora_lib.fold_scale)(state, groups, s)

  return base.Method(
      name="helora_kd",
      aggregate=lambda lora, ranks, n, scales: aggregate(lora, ranks, n, groups),
      init_state=lambda global_lora, client_ranks: init_groups(global_lora, groups),
      distribute=lambda state, ranks, scales, key: distribute(state, ranks, groups),
      server_update=lambda state, agg, ranks, base_params, public: server_update(
          spec, groups, state, *agg, base_params, public),
      global_adapters=fold, check_ranks=check_ranks, needs_public=True)


def run_options(run: base.Run) -> dict:
  """Groups: the run's distinct client ranks; the model's logits and the run's scale."""
  if not run.has_public:
    raise ValueError("method 'helora_kd' distils on public data: set data.public_examples > 0 "
                     "(e.g. 200).")
  return {"group_ranks": tuple(sorted(set(map(int, run.client_ranks)))), "logits_fn": run.logits_fn,
          "alpha": run.alpha, "scale_rule": run.scale_rule}
