"""What a federated LoRA method is: the :class:`Method` container every method module builds.

A method module (``hetlora/methods/<name>.py``) owns everything specific to
its paper and exposes:

- ``aggregate(lora, ranks, num_examples, scales)``: its jitted reduction of
  the stacked client factors (``a: [K, d_in, r_max]``, ``b: [K, r_max,
  d_out]``, ``ranks: int32[K]``, ``num_examples: float[K]``, ``scales:
  float[K]``), usable alone from any JAX code;
- ``make(**options) -> Method``: the method with its hyperparameters bound;
- ``run_options(run: Run) -> dict`` (optional): options the method derives
  from the run itself (FlexLoRA's SVD bound, HeLoRA-KD's rank groups), which
  the user's ``config.method.kwargs`` override.

A :class:`Method` is the server's view: its own state pytree between rounds,
how clients start a round, how uploads become the next state, what a model
evaluates, and what it adds to local training (:class:`Local`). The server,
experiment and trainer call these hooks and never name a method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hetlora import lora as lora_lib

LoRA = lora_lib.LoRA
State = Any
TRAINABLE = ("ab", "b")


@dataclasses.dataclass(frozen=True)
class Local:
  """What a method adds to every client's local training.

  Attributes:
    trainable: ``'ab'`` trains both factors; ``'b'`` keeps ``a`` at its
      starting value (the optimizer's update of ``a`` is replaced by zero).
    penalty: ``penalty(lora, rank) -> float32[]`` added to the mean data loss
      of every local step (gradients flow through it), or ``None``.
    next_rank: ``next_rank(rank, start, trained) -> int32[]`` the client's
      rank after local training (never larger) from its starting and trained
      trees, or ``None`` (ranks never change). Slots ``>=`` the new rank are
      zeroed before upload.
  """
  trainable: str = "ab"
  penalty: Callable[[LoRA, jax.Array], jax.Array] | None = None
  next_rank: Callable[[jax.Array, LoRA, LoRA], jax.Array] | None = None

  def __post_init__(self):
    if self.trainable not in TRAINABLE:
      raise ValueError(f"Local.trainable must be one of {TRAINABLE}, got {self.trainable!r}.")


@dataclasses.dataclass(frozen=True)
class Run:
  """The facts of a run a method may derive options from (:func:`hetlora.methods.build`).

  Attributes:
    client_ranks: ``int[N]`` every client's starting rank.
    clients_per_round: cohort size ``K``.
    r_min, r_max: the run's rank bounds (``config.lora``).
    alpha, scale_rule: the LoRA scale (``config.lora``).
    logits_fn: ``(base, lora_eff, batch) -> float32[B, C]`` classifier
      logits, or ``None`` for models without class logits.
    has_public: a public (server-side) data set exists (``data.public_examples > 0``).
  """
  client_ranks: np.ndarray
  clients_per_round: int
  r_min: int
  r_max: int
  alpha: float
  scale_rule: str
  logits_fn: Callable[..., jax.Array] | None = None
  has_public: bool = False


def truncate(state: LoRA, ranks: jax.Array, scales: jax.Array, key: jax.Array | None) -> LoRA:
  """Distribution by truncation (HetLoRA Sec. 3.1): client ``k`` gets slots ``< r_k``."""
  del scales, key
  return lora_lib.truncate(state, ranks)


def keep_aggregate(state: State, aggregated: Any, ranks: jax.Array, base_params: Any,
                   public: Any) -> State:
  """The aggregate is the next state."""
  del state, ranks, base_params, public
  return aggregated


def unchanged_base(state: State, base_params: Any) -> Any:
  """The clients train on the original base weights."""
  del state
  return base_params


def as_is(global_lora: LoRA, client_ranks: np.ndarray) -> State:
  """The state is the rank-``r_max`` global adapter."""
  del client_ranks
  return global_lora


def fold_at_r_max(state: LoRA, alpha: float, rule: str) -> LoRA:
  """One model, ``[1, ...]``: the adapter at ``r_max`` folded with the run's scale."""
  r_max = lora_lib.r_max_of(state)
  s = lora_lib.scale(r_max, alpha, rule, r_max)
  return jax.tree.map(lambda x: x[None], lora_lib.fold_scale(state, jnp.int32(r_max), s))


def no_check(client_ranks: np.ndarray, r_max: int) -> None:
  del client_ranks, r_max


def equal_ranks(name: str) -> Callable[[np.ndarray, int], None]:
  """A rank check for methods defined for one rank shared by every client."""
  def check(client_ranks: np.ndarray, r_max: int) -> None:
    del r_max
    distinct = sorted(set(np.asarray(client_ranks).tolist()))
    if len(distinct) > 1:
      raise ValueError(f"method {name!r} trains every client at one rank, got ranks {distinct}: set "
                       "lora.rank_choices to a single rank (e.g. (8,)), or use method.name='zero_pad' "
                       "for mixed ranks.")
  return check


@dataclasses.dataclass(frozen=True)
class Method:
  """One federated LoRA method as the server runs it.

  Attributes:
    name: the module name (``hetlora.methods.<name>``).
    aggregate: ``aggregate(lora [K], ranks, num_examples, scales) -> aggregated``
      (a tree or a method-specific pytree that ``server_update`` consumes).
    init_state: ``init_state(global_lora, client_ranks) -> state`` the
      method's own pytree between rounds, from the rank-``r_max`` initial adapter.
    distribute: ``distribute(state, ranks, scales, key) -> lora [K, ...]`` the
      clients' starting factors, masked to their ranks.
    server_update: ``server_update(state, aggregated, ranks, base_params, public)
      -> state`` (``base_params`` is the effective base the clients trained on).
    effective_base: ``effective_base(state, base_params) -> base_params`` the
      weights clients train and evaluate on (FLoRA merges updates into them).
    global_adapters: ``global_adapters(state, alpha, rule) -> lora_eff [G, ...]``
      the ``G`` folded adapters a model evaluates (``G = 1`` unless the
      method keeps one model per rank group).
    check_ranks: ``check_ranks(client_ranks, r_max)`` raises ``ValueError``
      for ranks the method cannot run.
    local: what the method adds to local training (:class:`Local`).
    needs_key: ``round_fn`` must get a PRNG ``key`` (fresh client adapters).
    needs_public: ``round_fn`` must get the ``public`` data (server-side distillation).
    dp_linear: the next state is a linear average of the clients' factors from a
      shared start, so client-level DP applies (:mod:`hetlora.privacy`).
  """
  name: str
  aggregate: Callable[..., Any]
  init_state: Callable[[LoRA, np.ndarray], State] = as_is
  distribute: Callable[[State, jax.Array, jax.Array, jax.Array | None], LoRA] = truncate
  server_update: Callable[..., State] = keep_aggregate
  effective_base: Callable[[State, Any], Any] = unchanged_base
  global_adapters: Callable[[State, float, str], LoRA] = fold_at_r_max
  check_ranks: Callable[[np.ndarray, int], None] = no_check
  local: Local = Local()
  needs_key: bool = False
  needs_public: bool = False
  dp_linear: bool = False
