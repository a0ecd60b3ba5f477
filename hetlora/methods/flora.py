"""FLoRA: noise-free aggregation by stacking, merged into the base every round.

Wang, Shen, Wang, Zhao, Zhang, Ma, Wang. FLoRA: Federated Fine-Tuning Large
Language Models with Heterogeneous Low-Rank Adaptations. NeurIPS 2024
(arXiv 2409.05976), Sec. 3 (stacking-based aggregation). Client factors are
concatenated along the rank axis, one side scaled by ``p_k s_k``::

    A_stack = [p_k s_k a_k diag(m_k)]_k : [d_in, K r_max]
    B_stack = [diag(m_k) b_k]_k         : [K r_max, d_out]
    A_stack B_stack = sum_k p_k s_k a_k diag(m_k) b_k          (exactly)

with ``p_k = n_k / sum_j n_j``. The server merges ``W <- W + A_stack B_stack``
and every client starts the next round from a *fresh* LoRA of its own rank
(``a`` random as in :func:`hetlora.lora.init`, ``b = 0``), drawn from a
per-client key.

What the server keeps (the method's state): the original ``W0`` stays
outside (the caller's ``base_params``); the state is ``{'lora': zeros,
'base_delta': ...}``, ``base_delta`` the running sum of merged dense updates
``[d_in, d_out]`` per adapted kernel at the LoRA tree's module paths. Clients
train and evaluate on ``W0 + base_delta`` (:func:`effective_base`); the
zero adapter only fixes the shapes of the fresh client adapters.

Scale: any rule (the authors use ``alpha = 2 r_k``, i.e. ``s_k = 2``);
``scales`` must be each client's actual ``s_k``. :func:`stack` (the
aggregator) returns rank width ``K r_max``, not ``r_max``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora.methods import base

LoRA = lora_lib.LoRA


def stacked_factors(mod: dict, ranks: jax.Array, w_a: jax.Array,
                    w_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Concatenates one module's client factors along the rank axis.

  Args:
    mod: one module of a stacked tree, ``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``.
    ranks: ``int32[K]``; w_a, w_b: ``float[K]`` per-client factors for each side.

  Returns:
    ``A = [w_a[k] a_k diag(m_k)]_k: [d_in, K r_max]`` and
    ``B = [w_b[k] diag(m_k) b_k]_k: [K r_max, d_out]``, so
    ``A B = sum_k w_a[k] w_b[k] a_k diag(m_k) b_k``.
  """
  k, d_in, r_max = mod["a"].shape
  m = lora_lib.rank_mask(ranks, r_max)                                  # [K, r_max]
  va, vb = m * w_a[:, None], m * w_b[:, None]
  a = jnp.transpose(mod["a"] * va[:, None, :].astype(mod["a"].dtype), (1, 0, 2))
  b = mod["b"] * vb[:, :, None].astype(mod["b"].dtype)
  return a.reshape(d_in, k * r_max), b.reshape(k * r_max, -1)


@jax.jit
def stack(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array) -> LoRA:
  """``{'a': A_stack [d_in, K r_max], 'b': B_stack [K r_max, d_out]}`` per module, scale 1.

  Args:
    lora: stacked tree ``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``.
    ranks: ``int32[K]``; num_examples: ``float[K]``; scales: ``float[K]``.

  Example:
    >>> lora = {'q': {'a': jnp.ones((2, 3, 2)), 'b': jnp.ones((2, 2, 4))}}
    >>> out = stack(lora, jnp.array([1, 2]), jnp.array([1., 1.]), jnp.array([2., 1.]))
    >>> out['q']['a'].shape, float((out['q']['a'] @ out['q']['b'])[0, 0])   # .5*2*1 + .5*1*2
    ((3, 4), 2.0)
  """
  aggregation.check_inputs(lora, ranks, num_examples, scales)
  w_a = aggregation.example_weights(num_examples) * scales.astype(jnp.float32)
  w_b = (jnp.asarray(num_examples) > 0).astype(jnp.float32)   # a client without examples adds nothing
  return lora_lib.map_modules(
      lambda mod: dict(zip(("a", "b"), stacked_factors(mod, ranks, w_a, w_b))), lora)


def fresh(key: jax.Array, like: LoRA, ranks: jax.Array) -> LoRA:
  """A fresh LoRA per client (``a`` as :func:`hetlora.lora.init`, ``b = 0``), masked.

  Args:
    key: this round's key, split per client.
    like: any single tree with the run's shapes (``a: [d_in, r_max]``).
    ranks: ``int32[K]``.

  Returns:
    Stacked tree ``a: [K, d_in, r_max]``, slots ``>= ranks[k]`` zero.
  """
  r_max = lora_lib.r_max_of(like)
  shapes = traverse_util.unflatten_dict(
      {path + "/kernel": jax.ShapeDtypeStruct((mod["a"].shape[0], mod["b"].shape[1]), mod["a"].dtype)
       for path, mod in lora_lib.modules(like).items()}, sep="/")
  dtype = next(iter(lora_lib.modules(like).values()))["a"].dtype
  init = lambda k: lora_lib.init(k, shapes, r"/kernel$", r_max, dtype)
  keys = jax.random.split(key, ranks.shape[0])
  return jax.vmap(lora_lib.mask)(jax.vmap(init)(keys), ranks)


aggregate = stack


def init_state(global_lora: LoRA, client_ranks) -> dict:
  """Zeros: nothing merged yet, and the (always zero) server adapter."""
  del client_ranks
  zeros = jax.tree.map(jnp.zeros_like, global_lora)
  return {"lora": zeros, "base_delta": lora_lib.delta(zeros, jnp.int32(lora_lib.r_max_of(zeros)), 0.0)}


def distribute(state: dict, ranks: jax.Array, scales: jax.Array, key: jax.Array) -> LoRA:
  """A fresh adapter per client (:func:`fresh`) from the round's ``key``."""
  del scales
  return fresh(key, state["lora"], ranks)


def merge(state: dict, aggregated: LoRA, ranks, base_params, public) -> dict:
  """``base_delta += A_stack B_stack``; the adapter stays zero."""
  del ranks, base_params, public
  merged = lora_lib.delta(aggregated, jnp.int32(lora_lib.r_max_of(aggregated)), 1.0)
  return {"lora": state["lora"], "base_delta": jax.tree.map(jnp.add, state["base_delta"], merged)}


def effective_base(state: dict, base_params):
  """``W0 + base_delta`` at every adapted kernel."""
  return lora_lib.add_to_kernels(base_params, state["base_delta"])


def make() -> base.Method:
  """FLoRA (no options)."""
  return base.Method(
      name="flora", aggregate=stack, init_state=init_state, distribute=distribute,
      server_update=merge, effective_base=effective_base,
      global_adapters=lambda state, alpha, rule: base.fold_at_r_max(state["lora"], alpha, rule),
      needs_key=True)
