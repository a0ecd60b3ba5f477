"""The global adapter of a trained workdir as an :class:`hetlora.export.Adapter`.

:func:`from_workdir` reads ``config.json`` and ``identity.json`` of a run
(:mod:`hetlora.workdir`), loads the base model through its provider (the
shapes, and the classifier head's starting weights, which the run draws from
its seed), rebuilds the method and restores the newest orbax checkpoint of the
server state. The exported model is the one the trainer evaluates: the
method's ``global_adapters`` on its ``effective_base``.

- **Scale.** ``global_adapters`` folds ``m * s`` into ``a``; the fold's scale
  ``s_g`` of group ``g`` is measured on an all-ones state, so ``a = a_eff /
  s_g`` is the unscaled factor and ``Adapter.scales`` holds ``s_g`` (the run's
  scale rule at the rank the method evaluates: ``r_max`` for most methods, the
  group rank for HeLoRA-KD, 1 for FlexLoRA's server adapter).
- **Rank** of a module: the highest slot ``j`` whose ``a[:, j]`` or ``b[j]``
  is nonzero, at least 1. A module that is all zero (an untrained FLoRA
  adapter) is written at rank 1 with zero factors, so every target module is
  present and the adapter adds nothing there.
- **Updates merged into the base** (FLoRA's ``effective_base``): each module's
  ``dW = delta + a_eff b`` is factored exactly by SVD at its numerical rank
  (singular values above ``1e-6`` of the largest) with scale 1; the adapter's
  ``r_max`` is then the largest such rank.
- **The head the checkpoint lacks** (the classifier head of
  ``bert_classifier``, the provider's ``HEAD_PATTERN``, drawn from the run's
  seed) goes to ``Adapter.extra`` as the run evaluates it: the FedAvg'd head
  of ``model.head='train'`` (the server state's dense trainables), the drawn
  head of ``'frozen'``, or ``W0 + dW`` of ``'lora'`` (a LoRA module without a
  Hugging Face name is merged into its kernel, never written as factors).
- **Groups.** HeLoRA-KD keeps one adapter per rank group; the default is the
  group of the largest exported rank, ``group`` picks another (0-based).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from hetlora import dense as dense_lib
from hetlora import experiment as experiment_lib
from hetlora import lora as lora_lib
from hetlora import methods as methods_lib
from hetlora import ranks as ranks_lib
from hetlora import server
from hetlora import workdir as workdir_lib
from hetlora.export import Adapter, hf_module_name
from hetlora.models import files
from hetlora.models import provider as provider_lib

SVD_TOLERANCE = 1e-6


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run's ``config.json`` as a ``ConfigDict`` (tuples come back as lists)."""
  path = Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: --workdir must be the directory of a run started by "
                            "launch/train.py (it writes config.json, identity.json and checkpoints/).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def module_rank(a: np.ndarray, b: np.ndarray) -> int:
  """The highest slot with a nonzero ``a[:, j]`` or ``b[j]``, plus one (at least 1).

  Example:
    >>> module_rank(np.array([[1., 0., 0.]]), np.array([[0.], [2.], [0.]]))
    2
  """
  used = np.flatnonzero(np.any(a != 0, axis=0) | np.any(b != 0, axis=1))
  return int(used[-1]) + 1 if used.size else 1


def _restore(workdir: Path, template: server.ServerState) -> tuple[server.ServerState, int]:
  directory = (workdir / "checkpoints").resolve()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is missing: the run in {workdir} saved no checkpoint yet; "
                            "train at least one round (launch/train.py --workdir ...).")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory} holds no checkpoint; train at least one round first.")
    restored = manager.restore(step, args=ocp.args.StandardRestore(server.checkpoint_tree(template)))
    return template.replace(**restored), int(step)
  finally:
    manager.close()


def _fold_scales(method, like, client_ranks, alpha: float, rule: str) -> np.ndarray:
  """``float[G]``: the scale ``global_adapters`` folds into ``a`` (probed on an all-ones state)."""
  ones = jax.tree.map(jnp.ones_like, like)
  folded = method.global_adapters(method.init_state(ones, client_ranks), alpha, rule)
  first = next(iter(lora_lib.modules(folded).values()))["a"]
  return np.asarray(jnp.max(first.reshape(first.shape[0], -1), axis=1))


def _svd_factors(dw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact ``dW = a @ b`` at the numerical rank (at least 1): ``a: [d_in, k]``, ``b: [k, d_out]``."""
  u, sv, vt = np.linalg.svd(dw.astype(np.float64), full_matrices=False)
  k = max(int(np.sum(sv > SVD_TOLERANCE * (sv[0] if sv.size else 0.0))), 1)
  return (u[:, :k] * sv[:k]).astype(np.float32), vt[:k].astype(np.float32)


def _pad(x: np.ndarray, width: int, axis: int) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, width - x.shape[axis])
  return np.pad(x, pad)


def from_workdir(workdir: str | os.PathLike, group: int | None = None) -> Adapter:
  """The trained global adapter of ``workdir`` (its newest checkpoint); see the module docstring.

  Raises:
    FileNotFoundError: no run, or no checkpoint, in ``workdir``.
    ValueError: ``group`` out of range, or the rebuilt adapter's shapes differ from the run's
      (``identity.json``: the model files changed since training).
  """
  workdir = Path(workdir)
  config = read_config(workdir)
  identity = json.loads((workdir / workdir_lib.IDENTITY_FILE).read_text())
  provider = provider_lib.get(config.model.kind)
  head_key, lora_key = jax.random.split(jax.random.key(config.seed))   # as hetlora.experiment.build
  num_labels = identity["derived"]["num_labels"] if provider.TASK == "classification" else None
  loaded = provider.load(config.model, num_labels=num_labels, key=head_key)
  r_max, alpha, rule = int(config.lora.r_max), float(config.lora.alpha), config.lora.scale_rule
  pattern, dense_pattern = experiment_lib.trainable_patterns(config, provider, loaded.base_params)
  like = lora_lib.init(lora_key, loaded.base_params, pattern, r_max)
  shapes = {p: " ".join(f"{k}{list(v.shape)}" for k, v in sorted(m.items()))
            for p, m in lora_lib.modules(like).items()}
  if shapes != identity["derived"]["lora_shapes"]:
    raise ValueError(f"the LoRA modules rebuilt from config.model.name={config.model.name!r} differ from "
                     f"those the run in {workdir} trained ({workdir_lib.IDENTITY_FILE}); export with the "
                     "model files the run used.")
  client_ranks = ranks_lib.assign(config.data.num_clients, config.seed, config.lora.r_min, r_max,
                                  tuple(config.lora.rank_choices), config.lora.rank_distribution)
  run = methods_lib.Run(client_ranks=client_ranks, clients_per_round=config.server.clients_per_round,
                        r_min=config.lora.r_min, r_max=r_max, alpha=alpha, scale_rule=rule,
                        logits_fn=loaded.logits_fn, has_public=config.data.public_examples > 0)
  method = methods_lib.build(config.method.name, run, config.method.kwargs.to_dict())
  dense = dense_lib.select(loaded.base_params, dense_pattern)
  state, _ = _restore(workdir, server.init(like, client_ranks, method, dense=dense))

  try:
    modules, ranks, scales, width = global_factors(method, state.method_state, like, client_ranks, alpha,
                                                   rule, group)
  except IndexError as e:
    raise ValueError(f"--group={group}: {e}") from None
  base = dense_lib.overlay(loaded.base_params, state.dense)
  extra = {p: np.asarray(x, np.float32) for p, x in traverse_util.flatten_dict(
      dense_lib.select(base, getattr(provider, "HEAD_PATTERN", "")), sep="/").items()}
  base_flat = traverse_util.flatten_dict(base, sep="/")
  for path in [p for p in modules if hf_module_name(config.model.kind, p) is None]:
    mod, r, s = modules.pop(path), ranks.pop(path), scales.pop(path)
    dw = s * mod["a"][:, :r] @ mod["b"][:r]
    extra[path + "/kernel"] = np.asarray(base_flat[path + "/kernel"], np.float32) + dw
    if path + "/bias" in base_flat:
      extra[path + "/bias"] = np.asarray(base_flat[path + "/bias"], np.float32)
  return Adapter(modules=modules, ranks=ranks, scales=scales, scale_rule=rule, alpha=alpha, r_max=width,
                 model_kind=config.model.kind,
                 model_name=str(files.resolve(config.model.name or provider.DEFAULT_NAME).resolve()),
                 extra=extra)


def global_factors(method, method_state, like, client_ranks, alpha: float, rule: str,
                   group: int | None = None):
  """``(modules, ranks, scales, width)`` of the model ``method`` evaluates from ``method_state``.

  Args:
    method: the run's :class:`hetlora.methods.Method`.
    method_state: its restored state.
    like: a LoRA tree of the run's shapes (``a: [d_in, r_max]``).
    client_ranks: ``int[N]`` the run's starting client ranks (for ``init_state``).
    alpha, rule: ``config.lora.alpha`` / ``scale_rule``.
    group: which of the ``G`` global adapters (default: the one of the largest rank).

  Returns:
    Unscaled factors ``{path: {'a': [d_in, width], 'b': [width, d_out]}}``, ranks, scales and
    ``width`` (``r_max``, or the largest SVD rank when updates were merged into the base), such that
    ``scale * a[:, :r] @ b[:r]`` is the module's update (see the module docstring).

  Raises:
    IndexError: ``group`` is not in ``[0, G)``.
  """
  r_max = lora_lib.r_max_of(like)
  folded = lora_lib.modules(method.global_adapters(method_state, alpha, rule))   # a: [G, ...]
  fold_scale = _fold_scales(method, like, client_ranks, alpha, rule)
  kernels = {p: jnp.zeros((m["a"].shape[0], m["b"].shape[1]), m["a"].dtype)
             for p, m in lora_lib.modules(like).items()}
  zero_base = traverse_util.unflatten_dict({p + "/kernel": k for p, k in kernels.items()}, sep="/")
  merged = traverse_util.flatten_dict(method.effective_base(method_state, zero_base), sep="/")
  delta = {p: np.asarray(merged[p + "/kernel"]) for p in kernels}
  in_base = any(np.any(d != 0) for d in delta.values())
  num_groups = next(iter(folded.values()))["a"].shape[0]
  candidates = [_group(folded, g, float(fold_scale[g]), delta, in_base, r_max, alpha, rule)
                for g in range(num_groups)]
  if group is None:
    group = max(range(num_groups), key=lambda g: (max(candidates[g][1].values()), g))
  elif not 0 <= group < num_groups:
    raise IndexError(f"the method keeps {num_groups} global adapter(s), groups 0..{num_groups - 1}")
  return candidates[group]


def _group(folded, g: int, s_fold: float, delta, in_base: bool, r_max: int, alpha: float, rule: str):
  """``(modules, ranks, scales, width)`` of group ``g`` (see the module docstring)."""
  factors, scales = {}, {}
  for path, mod in folded.items():
    a_eff, b = np.asarray(mod["a"][g], np.float32), np.asarray(mod["b"][g], np.float32)
    if in_base:
      factors[path] = _svd_factors(delta[path] + a_eff @ b)
      scales[path] = 1.0
    elif s_fold > 0:
      factors[path], scales[path] = (a_eff / s_fold, b), s_fold
    else:   # the method's adapter is zero and nothing merged: zeros at the run's scale
      factors[path] = (a_eff, b)
      scales[path] = float(lora_lib.scale(r_max, alpha, rule, r_max))
  width = max(a.shape[1] for a, _ in factors.values()) if in_base else r_max
  modules = {p: {"a": _pad(a, width, 1), "b": _pad(b, width, 0)} for p, (a, b) in factors.items()}
  ranks = {p: module_rank(m["a"], m["b"]) for p, m in modules.items()}
  return modules, ranks, scales, width
