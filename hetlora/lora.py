"""The LoRA tree: masked-rank low-rank adapters as a plain pytree.

A LoRA tree mirrors the module paths of the base parameters it adapts. For
every selected 2-D kernel ``W0: [d_in, d_out]`` at ``.../<module>/kernel``
it holds ``{'a': [d_in, r_max], 'b': [r_max, d_out]}`` at ``.../<module>``.
A client of rank ``r`` uses only the first ``r`` rank slots; the others are
zero and stay zero because every use multiplies the rank axis by the mask
``m = 1[arange(r_max) < r]``. The update of one kernel is::

    dW = s * a @ diag(m) @ b,        s = scale(r)      (Hu et al., 2021)

and a model computes ``x @ W0 + ((x @ a) * (m * s)) @ b``. Models never see
ranks: :func:`fold_scale` multiplies ``m * s`` into ``a`` so a model only
computes ``x @ W0 + (x @ a_eff) @ b`` (gradients of masked slots are then
exactly zero).

All functions act on one client's tree; stack clients with ``jax.vmap``.
Ranks are ``int32`` arrays inside jit, never Python ints.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Mapping[str, Any]
LoRA = Mapping[str, Any]

SCALE_RULES = ("alpha/r", "alpha/r_max", "rslora")


def is_module(node: Any) -> bool:
  """True for one adapted module's ``{'a', 'b'}`` dict (a leaf for tree maps)."""
  return isinstance(node, Mapping) and set(node.keys()) == {"a", "b"}


def map_modules(fn: Callable[..., Any], *trees: LoRA) -> LoRA:
  """Applies ``fn(module, *others)`` to every ``{'a', 'b'}`` pair of the trees."""
  return jax.tree.map(fn, *trees, is_leaf=is_module)


def modules(lora: LoRA) -> dict[str, Mapping[str, jax.Array]]:
  """Flat ``{'path/to/module': {'a', 'b'}}`` view, in sorted path order."""
  flat = traverse_util.flatten_dict(lora, sep="/")
  out: dict[str, dict[str, jax.Array]] = {}
  for key in sorted(flat):
    path, leaf = key.rsplit("/", 1)
    out.setdefault(path, {})[leaf] = flat[key]
  return out


def init(
    key: jax.Array,
    base_params: Params,
    pattern: str,
    r_max: int,
    dtype: Any = jnp.float32,
) -> LoRA:
  """A fresh LoRA tree for the kernels whose path matches ``pattern``.

  ``a`` is drawn like PEFT's ``kaiming_uniform(a=sqrt(5))``, i.e.
  ``U(-1/sqrt(d_in), 1/sqrt(d_in))``; ``b`` is zero, so the adapted model
  starts equal to the base model.

  Args:
    key: PRNG key.
    base_params: the base model's parameter tree (e.g. ``variables['params']``).
    pattern: regex searched in each ``'/'``-joined kernel path, e.g.
      ``r'attention/(query|value)/kernel$'``.
    r_max: width of the rank axis.
    dtype: dtype of the factors.

  Returns:
    Nested dict with ``{'a': [d_in, r_max], 'b': [r_max, d_out]}`` per module.

  Example:
    >>> params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
    >>> lora = init(jax.random.key(0), params, 'dense/kernel', r_max=2)
    >>> lora['dense']['a'].shape, lora['dense']['b'].shape
    ((4, 2), (2, 3))
  """
  if r_max < 1:
    raise ValueError(f"r_max must be >= 1, got {r_max}; set config.lora.r_max to a positive int.")
  regex = re.compile(pattern)
  flat = traverse_util.flatten_dict(base_params, sep="/")
  paths = sorted(p for p in flat if p.endswith("/kernel") and regex.search(p))
  if not paths:
    raise ValueError(
        f"lora.pattern {pattern!r} matches no kernel; set config.lora.pattern to a regex that matches "
        "some of the kernels: "
        f"{sorted(p for p in flat if p.endswith('kernel'))[:20]}")
  keys = jax.random.split(key, len(paths))
  out = {}
  for k, path in zip(keys, paths):
    kernel = flat[path]
    if kernel.ndim != 2:
      raise ValueError(f"LoRA needs 2-D kernels [d_in, d_out]; {path} has shape {kernel.shape}.")
    d_in, d_out = kernel.shape
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(k, (d_in, r_max), dtype, -bound, bound)
    b = jnp.zeros((r_max, d_out), dtype)
    module = path[: -len("/kernel")]
    out[module + "/a"] = a
    out[module + "/b"] = b
  return traverse_util.unflatten_dict(out, sep="/")


def r_max_of(lora: LoRA) -> int:
  """The rank-axis width (static) of a single or stacked LoRA tree."""
  return next(iter(modules(lora).values()))["b"].shape[-2]


def rank_mask(rank: jax.Array, r_max: int) -> jax.Array:
  """``float32[..., r_max]`` with ones at slots ``< rank`` (``rank: int[...]``)."""
  rank = jnp.asarray(rank)
  return (jnp.arange(r_max) < rank[..., None]).astype(jnp.float32)


def scale(rank: jax.Array, alpha: float, rule: str, r_max: int) -> jax.Array:
  """The LoRA scale ``s`` for ``rank`` under ``rule``.

  Rules: ``'alpha/r'`` (PEFT's default with the client's own rank),
  ``'alpha/r_max'`` (one scale for all clients), ``'rslora'``
  (``alpha / sqrt(r)``, Kalajdzievski 2023). Rank 0 gives scale 0.
  """
  rank = jnp.asarray(rank, jnp.float32)
  safe = jnp.maximum(rank, 1.0)
  if rule == "alpha/r":
    s = alpha / safe
  elif rule == "alpha/r_max":
    s = jnp.full_like(rank, alpha / r_max)
  elif rule == "rslora":
    s = alpha / jnp.sqrt(safe)
  else:
    raise ValueError(f"lora.scale_rule must be one of {SCALE_RULES}, got {rule!r}; set config.lora.scale_rule.")
  return jnp.where(rank > 0, s, 0.0)


def mask(lora: LoRA, rank: jax.Array) -> LoRA:
  """Zeroes the rank slots ``>= rank`` of one client's tree."""
  m = rank_mask(rank, r_max_of(lora))
  return map_modules(lambda mod: {"a": mod["a"] * m.astype(mod["a"].dtype),
                                  "b": mod["b"] * m[:, None].astype(mod["b"].dtype)}, lora)


def fold_scale(lora: LoRA, rank: jax.Array, s: jax.Array) -> LoRA:
  """The tree a model consumes: ``a_eff = a * (m * s)``, ``b`` unchanged."""
  v = rank_mask(rank, r_max_of(lora)) * s
  return map_modules(lambda mod: {"a": mod["a"] * v.astype(mod["a"].dtype), "b": mod["b"]}, lora)


def truncate(global_lora: LoRA, ranks: jax.Array) -> LoRA:
  """Distribution by truncation (HetLoRA, Cho et al. 2024, Sec. 3.1).

  Args:
    global_lora: the server's tree, ``a: [d_in, r_max]``.
    ranks: ``int32[K]`` client ranks.

  Returns:
    Stacked tree ``a: [K, d_in, r_max]`` whose slots ``>= ranks[k]`` are zero.
  """
  return jax.vmap(mask, in_axes=(None, 0))(global_lora, ranks)


def delta(lora: LoRA, rank: jax.Array, s: jax.Array) -> LoRA:
  """Dense updates ``dW = s * a diag(m) b: [d_in, d_out]`` per module."""
  v = rank_mask(rank, r_max_of(lora)) * s
  return map_modules(lambda mod: (mod["a"] * v) @ mod["b"], lora)


def add_to_kernels(params: Params, deltas: Any) -> Params:
  """``params`` with ``deltas[path]`` (``[d_in, d_out]``) added to each ``path/kernel``."""
  flat = dict(traverse_util.flatten_dict(params, sep="/"))
  for path, dw in traverse_util.flatten_dict(deltas, sep="/").items():
    kernel = flat[path + "/kernel"]
    flat[path + "/kernel"] = (kernel + dw).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def merge(base_params: Params, lora: LoRA, rank: jax.Array, s: jax.Array) -> Params:
  """Base parameters with every adapted kernel replaced by ``W0 + dW``."""
  return add_to_kernels(base_params, delta(lora, rank, s))


def resize(lora: LoRA, r_new: int) -> LoRA:
  """Zero-pads or slices the rank axis to width ``r_new`` (single or stacked)."""
  def one(mod):
    r = mod["b"].shape[-2]
    if r_new <= r:
      return {"a": mod["a"][..., :r_new], "b": mod["b"][..., :r_new, :]}
    pa = [(0, 0)] * (mod["a"].ndim - 1) + [(0, r_new - r)]
    pb = [(0, 0)] * (mod["b"].ndim - 2) + [(0, r_new - r), (0, 0)]
    return {"a": jnp.pad(mod["a"], pa), "b": jnp.pad(mod["b"], pb)}
  return map_modules(one, lora)


def num_params(lora: LoRA, rank: jax.Array) -> jax.Array:
  """Communicated parameters of a rank-``rank`` adapter: ``sum r (d_in + d_out)``."""
  sizes = [mod["a"].shape[-2] + mod["b"].shape[-1] for mod in modules(lora).values()]
  return jnp.asarray(rank) * int(sum(sizes))
