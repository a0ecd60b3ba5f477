"""Building a federated experiment from an ``ml_collections`` config.

:func:`build` turns a config (see ``configs/``) into an :class:`Experiment`:
the base model and its loss, the tokenized and partitioned data, the
clients' ranks, the method, the initial server state and the jitted round.
Everything is a pure function of the config: the same config and seed give
the same experiment. Config errors name the field and the fix.

Config sections: ``model`` (``name``, ``pooling``, ``max_len``, ``dtype``),
``data`` (``source``, ``source_kwargs``, ``partition``, ``num_clients``,
``test_kwargs``, ``dirichlet_alpha``, ``min_client_size``, ``max_train_examples``,
``max_test_examples``, ``public_examples``), ``lora`` (``pattern``, ``r_min``,
``r_max``, ``rank_choices``, ``rank_distribution``, ``alpha``,
``scale_rule``), ``method`` (``name``, ``kwargs``), ``client``
(``optimizer``, ``learning_rate``, ``weight_decay``, ``batch_size``,
``local_epochs`` or ``local_steps``, ``backend``, ``chunk_size``, ``pruning``), ``server``
(``rounds``, ``clients_per_round``), ``eval`` (``every``, ``batch_size``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hetlora import client as client_lib
from hetlora import data as data_lib
from hetlora import flexlora
from hetlora import lora as lora_lib
from hetlora import methods as methods_lib
from hetlora import parallel
from hetlora import ranks as ranks_lib
from hetlora import server
from hetlora.models import bert, bert_loading, tasks, tokenizer

OPTIMIZERS = ("adamw", "adam", "sgd")
BACKENDS = ("vmap", "sequential", "chunked", "sharded")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs; arrays on the host unless noted.

  Attributes:
    config: the validated config.
    base_params: frozen base weights (device arrays), shared by all clients.
    logits_fn: ``(base, lora_eff, batch) -> float32[B, C]``.
    spec: the clients' :class:`hetlora.client.LocalSpec`.
    method: the :class:`hetlora.methods.Method`.
    round_fn: jitted ``(state, base, cohort, data, n, key, public) -> (state, result)``.
    init_state: the server state at round 0.
    train: tokenized training columns ``{name: [N, L]}``, ``label: int32[N]``.
    test: tokenized test columns.
    partition: per-client index arrays into ``train``.
    public: ``{'batch': [steps, B, ...], 'mask': [steps, B]}`` or ``None`` (HeLoRA-KD).
    steps: local steps per round (fixed for the run, so shapes never change).
    label_names: class names.
  """
  config: ml_collections.ConfigDict
  base_params: Any
  logits_fn: Callable[..., jax.Array]
  spec: client_lib.LocalSpec
  method: methods_lib.Method
  round_fn: Callable[..., Any]
  init_state: server.ServerState
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  partition: list[np.ndarray]
  public: dict[str, Any] | None
  steps: int
  label_names: list[str]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first bad field and how to fix it."""
  c = config
  if c.method.name not in methods_lib.names():
    raise ValueError(f"method.name={c.method.name!r} is unknown; choose one of {methods_lib.names()}.")
  if c.data.source not in data_lib.SOURCES:
    raise ValueError(f"data.source={c.data.source!r} is unknown; choose one of {sorted(data_lib.SOURCES)}.")
  if not 1 <= c.lora.r_min <= c.lora.r_max:
    raise ValueError(f"lora.r_min={c.lora.r_min} and lora.r_max={c.lora.r_max} must satisfy "
                     "1 <= r_min <= r_max; lower r_min or raise r_max.")
  if c.data.partition == "dirichlet" and not c.data.dirichlet_alpha > 0:
    raise ValueError(f"data.dirichlet_alpha={c.data.dirichlet_alpha} must be > 0 (e.g. 0.5, 0.1, 0.01).")
  if not 1 <= c.server.clients_per_round <= c.data.num_clients:
    raise ValueError(f"server.clients_per_round={c.server.clients_per_round} must be in "
                     f"[1, data.num_clients={c.data.num_clients}]; lower it or add clients.")
  if c.server.rounds < 1:
    raise ValueError(f"server.rounds={c.server.rounds} must be >= 1.")
  if c.client.optimizer not in OPTIMIZERS:
    raise ValueError(f"client.optimizer={c.client.optimizer!r} is unknown; choose one of {OPTIMIZERS}.")
  if bool(c.client.local_epochs) == bool(c.client.local_steps):
    raise ValueError("set exactly one of client.local_epochs and client.local_steps (the other to 0).")
  if c.client.backend not in BACKENDS:
    raise ValueError(f"client.backend={c.client.backend!r} must be one of {BACKENDS}.")
  if c.client.backend == "chunked" and c.client.get("chunk_size", 0) < 1:
    raise ValueError("client.backend='chunked' needs client.chunk_size >= 1 (clients per chunk).")
  if c.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype={c.model.dtype!r} must be one of {sorted(DTYPES)}.")
  if c.lora.scale_rule not in lora_lib.SCALE_RULES:
    raise ValueError(f"lora.scale_rule={c.lora.scale_rule!r} must be one of {lora_lib.SCALE_RULES}.")


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The clients' optimizer from ``config.client``."""
  if c.optimizer == "adamw":
    return optax.adamw(c.learning_rate, weight_decay=c.weight_decay)
  if c.optimizer == "adam":
    return optax.adam(c.learning_rate)
  return optax.sgd(c.learning_rate)


def _subsample(ds, limit: int, seed: int):
  if not limit or limit >= len(ds):
    return ds
  idx = np.sort(np.random.default_rng([seed, limit]).choice(len(ds), limit, replace=False))
  return ds.select(idx)


def load_data(config: ml_collections.ConfigDict, encode_fn: Callable, max_len: int):
  """Tokenized train/test columns, the public slice (or ``None``) and label names."""
  d = config.data
  kwargs = dict(d.source_kwargs)
  test_kwargs = {**kwargs, **dict(d.test_kwargs)}
  if "split" in inspect.signature(data_lib.SOURCES[d.source]).parameters:
    train_ds = data_lib.get_source(d.source, split="train", **kwargs)
    test_ds = data_lib.get_source(d.source, **{"split": "test", **test_kwargs})
  elif not d.test_kwargs:
    raise ValueError(f"data.source={d.source!r} has no splits: set data.test_kwargs "
                     "(e.g. {'path': 'test.csv'}) to the held-out data.")
  else:
    train_ds = data_lib.get_source(d.source, **kwargs)
    test_ds = data_lib.get_source(d.source, **test_kwargs)
  train_ds = _subsample(train_ds, d.max_train_examples, config.seed)
  test_ds = _subsample(test_ds, d.max_test_examples, config.seed + 1)
  public = None
  if d.public_examples:  # held out of the training set, so disjoint from every client
    order = np.random.default_rng([config.seed, 7]).permutation(len(train_ds))
    public = data_lib.tokenize_dataset(train_ds.select(np.sort(order[:d.public_examples])),
                                       encode_fn, max_len)
    train_ds = train_ds.select(np.sort(order[d.public_examples:]))
  train = data_lib.tokenize_dataset(train_ds, encode_fn, max_len)
  test = data_lib.tokenize_dataset(test_ds, encode_fn, max_len)
  return train, test, public, list(train_ds.label_names)


def _partition(config, labels: np.ndarray) -> list[np.ndarray]:
  d = config.data
  options = {}
  if d.partition == "dirichlet":
    options = dict(alpha=d.dirichlet_alpha, min_size=d.min_client_size)
  elif d.partition == "shards":
    options = dict(shards_per_client=d.shards_per_client)
  return data_lib.make_partition(d.partition, labels=labels, num_clients=d.num_clients,
                                 seed=config.seed, **options)


def _public_batches(public: dict[str, np.ndarray] | None, batch_size: int):
  if public is None:
    return None
  stacked = list(data_lib.batches(public, batch_size))
  batch = {k: np.stack([b[k] for b in stacked]) for k in stacked[0] if k != "mask"}
  return {"batch": batch, "mask": np.stack([b["mask"] for b in stacked])}


def _method_options(config, client_ranks: np.ndarray, logits_fn, public) -> dict[str, Any]:
  """``config.method.kwargs`` plus the options a method takes from the run itself."""
  options = dict(config.method.kwargs)
  if config.method.name == "helora_kd":
    if public is None:
      raise ValueError("method helora_kd distils on public data: set data.public_examples > 0.")
    options.setdefault("group_ranks", tuple(sorted(set(map(int, client_ranks)))))
    options.update(logits_fn=logits_fn, alpha=config.lora.alpha, scale_rule=config.lora.scale_rule)
  elif config.method.name == "flexlora":  # the SVD then works on the cohort's actual ranks
    options.setdefault("core_rank", flexlora.core_rank_bound(
        client_ranks, config.server.clients_per_round, config.lora.r_max))
  return options


def make_backend(c: ml_collections.ConfigDict, spec: client_lib.LocalSpec):
  """``config.client.backend`` as :func:`hetlora.server.make_round` takes it.

  ``'vmap'`` / ``'sequential'`` by name; ``'chunked'`` trains
  ``client.chunk_size`` clients at a time; ``'sharded'`` puts the client axis
  over every device (:func:`hetlora.parallel.client_mesh`), also across hosts.
  """
  if c.backend == "chunked":
    return parallel.chunked_backend(spec, c.chunk_size)
  if c.backend == "sharded":
    return parallel.sharded_backend(spec, parallel.client_mesh(), chunk_size=c.get("chunk_size") or None)
  return c.backend


def build(config: ml_collections.ConfigDict) -> Experiment:
  """Builds the experiment described by ``config`` (see the module docstring)."""
  validate(config)
  dtype = DTYPES[config.model.dtype]
  bert_config, encoder = bert_loading.load_bert(config.model.name)
  tok = tokenizer.load_tokenizer(config.model.name, max_len=config.model.max_len)
  encode_fn = functools.partial(tokenizer.encode, tok, max_len=config.model.max_len)
  train, test, public, label_names = load_data(config, encode_fn, config.model.max_len)
  num_labels = len(label_names)
  model = bert.BertClassifier(bert_config, num_labels, pooling=config.model.pooling, dtype=dtype)
  key = jax.random.key(config.seed)
  head_key, lora_key = jax.random.split(key)
  base = {**encoder, **bert.init_head(head_key, bert_config, num_labels)}
  logits_fn = tasks.classification_predict(model)

  partition = _partition(config, train["label"])
  client_ranks = ranks_lib.assign(config.data.num_clients, config.seed, config.lora.r_min,
                                  config.lora.r_max, tuple(config.lora.rank_choices),
                                  config.lora.rank_distribution)
  global_lora = lora_lib.init(lora_key, base, config.lora.pattern, config.lora.r_max)
  method = methods_lib.get_method(config.method.name,
                                  **_method_options(config, client_ranks, logits_fn, public))
  p = config.client.pruning
  spec = client_lib.LocalSpec(
      loss_fn=tasks.classification_loss(model), optimizer=make_optimizer(config.client),
      alpha=config.lora.alpha, scale_rule=config.lora.scale_rule,
      pruning=client_lib.Pruning(lam=p.lam, gamma=p.gamma, r_min=config.lora.r_min, enabled=p.enabled),
      trainable=method.trainable)
  if config.client.local_steps:
    steps = int(config.client.local_steps)
  else:
    steps = data_lib.epoch_steps([len(ix) for ix in partition], config.client.batch_size,
                                 config.client.local_epochs)
  return Experiment(
      config=config, base_params=base, logits_fn=logits_fn, spec=spec, method=method,
      round_fn=server.make_round(spec, None, backend=make_backend(config.client, spec), method=method),
      init_state=server.init(global_lora, client_ranks, method=method),
      train=train, test=test, partition=partition,
      public=_public_batches(public, config.client.batch_size), steps=steps, label_names=label_names)


def cohort_data(exp: Experiment, cohort: np.ndarray, round_index: int):
  """Host-packed ``({'batch', 'mask'}, num_examples)`` of ``cohort`` for ``round_index``."""
  c = exp.config.client
  packed = data_lib.pack_cohort(
      exp.train, [exp.partition[i] for i in cohort], c.batch_size,
      local_epochs=c.local_epochs or None, local_steps=c.local_steps or None, seed=exp.config.seed,
      round_idx=round_index, client_ids=cohort, pad_steps_to=exp.steps)
  n = packed.pop("num_examples")
  mask = packed.pop("mask")
  return {"batch": packed, "mask": mask}, n
