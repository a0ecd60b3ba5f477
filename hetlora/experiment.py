"""Building a federated experiment from an ``ml_collections`` config.

:func:`build` turns a config (see ``configs/``) into an :class:`Experiment`:
the base model and its loss, the tokenized and partitioned data, the
clients' ranks, the method, the initial server state and the jitted round.
Everything is a pure function of the config: the same config and seed give
the same experiment. Config errors name the field and the fix.

The model comes from the provider ``hetlora.models.<config.model.kind>``
(:mod:`hetlora.models.provider`): the BERT-family classifier
(``bert_classifier``) or the Llama-family causal LM (``llama_lm``); the
experiment names no model family and no method.

Config sections: ``model`` (``kind``, ``name``, ``pooling``, ``max_len``, ``dtype``, ``head``),
``data`` (``source``, ``source_kwargs``, ``partition``, ``num_clients``,
``test_kwargs``, ``dirichlet_alpha``, ``min_client_size``, ``max_train_examples``,
``max_test_examples``, ``public_examples``, ``unseen_tasks``, ``packing``, ``pack_rows``, ``row_stream``), ``lora`` (``pattern``, ``r_min``,
``r_max``, ``rank_choices``, ``rank_distribution``, ``alpha``,
``scale_rule``, ``init_from``), ``method`` (``name``, ``kwargs``), ``client``
(``optimizer``, ``learning_rate``, ``weight_decay``, ``batch_size``,
``local_epochs`` or ``local_steps``, ``backend``, ``chunk_size``, ``clip_norm``), ``server``
(``rounds``, ``clients_per_round``, ``max_update_norm``), ``privacy`` (``noise_multiplier``,
``delta``), ``eval`` (``every``, ``batch_size``, ``at_start``, ``generate_examples``,
``max_new_tokens``, ``answer_marker``, ``samples_per_task``, ``choice_examples``).

Instruction data can hold whole tasks out of training (``data.unseen_tasks``):
their instances reach no client, and their test instances form the
``unseen`` evaluation set (:func:`hold_out_tasks`). A model provider that
generates (``Loaded.generation_eval``) answers up to ``eval.generate_examples``
prompts of the test set and of the unseen set at every evaluation
(:func:`make_generation_eval`); one that scores answer options
(``Loaded.choice_eval``) evaluates multiple-choice test data by the options'
log-likelihood (:func:`make_choice_eval`).

With ``data.packing`` the training batches are packed (:mod:`hetlora.data.segments`):
each local step's examples, the same ones as unpacked, share ``R`` token rows,
``R = data.pack_rows`` or, when 0, the most any step of the run's
``server.rounds`` sampled cohorts needs (:func:`pack_rows`), fixed for the run.
With ``data.row_stream`` too, each client's non-empty rows of a round train
one at a time (:mod:`hetlora.data.row_stream`), ``S`` rows a client
(:func:`stream_rows`), so no empty row is computed.
Evaluation and the public (distillation) batches stay unpacked.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from hetlora import client as client_lib
from hetlora import data as data_lib
from hetlora import dense as dense_lib
from hetlora import lora as lora_lib
from hetlora import methods as methods_lib
from hetlora import parallel
from hetlora import privacy as privacy_lib
from hetlora import ranks as ranks_lib
from hetlora import screening as screening_lib
from hetlora import server
from hetlora.data import row_stream as row_stream_lib
from hetlora.data import segments as segments_lib
from hetlora.export import peft as peft_export
from hetlora.models import generation as generation_lib
from hetlora.models import provider as provider_lib

OPTIMIZERS = ("adamw", "adam", "sgd")
BACKENDS = ("vmap", "sequential", "chunked", "sharded")
HEADS = ("lora", "frozen", "train")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs; arrays on the host unless noted.

  Attributes:
    config: the validated config.
    base_params: base weights (device arrays), shared by all clients; frozen but for the dense
      trainables (``spec.dense``, e.g. ``model.head='train'``), whose starting values they hold.
    logits_fn: ``(base, lora_eff, batch) -> float32[B, C]`` class logits, or ``None``.
    eval_sums: ``(base, lora_eff, batch) -> {metric: (sum, weight)}`` (the model provider's).
    spec: the clients' :class:`hetlora.client.LocalSpec`.
    method: the :class:`hetlora.methods.Method`.
    round_fn: jitted ``(state, base, cohort, data, n, key, public) -> (state, result)``.
    global_lora: the initial rank-``r_max`` adapter (shapes of every module).
    init_state: the server state at round 0.
    train: tokenized training columns ``{name: [N, L]}`` (``label: int32[N]`` for classifiers).
    test: tokenized test columns.
    partition: per-client index arrays into ``train``.
    public: ``{'batch': [steps, B, ...], 'mask': [steps, B]}`` or ``None`` (for server-side distillation).
    steps: local steps per round (fixed for the run, so shapes never change).
    label_names: class names (empty for language models).
    unseen: tokenized columns of the held-out tasks' test instances (``data.unseen_tasks``), or ``None``.
    generation_eval: ``evaluate(base, adapters [G]) -> (metrics {set: {metric: [G]}}, samples)``
      on the ``'test'`` and ``'unseen'`` prompts (:func:`make_generation_eval`), or ``None``.
    choice_eval: the same for the options of multiple-choice test data (:func:`make_choice_eval`),
      or ``None``.
    pack_rows: token rows per packed training batch (``data.packing``), or 0: unpacked.
    stream_rows: rows of each client's row stream (``data.row_stream``), or 0: packed steps.
  """
  config: ml_collections.ConfigDict
  base_params: Any
  logits_fn: Callable[..., jax.Array] | None
  eval_sums: Callable[..., dict[str, Any]]
  spec: client_lib.LocalSpec
  method: methods_lib.Method
  round_fn: Callable[..., Any]
  global_lora: Any
  init_state: server.ServerState
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  partition: list[np.ndarray]
  public: dict[str, Any] | None
  steps: int
  label_names: list[str]
  unseen: dict[str, np.ndarray] | None = None
  generation_eval: Callable[..., tuple[dict, list]] | None = None
  choice_eval: Callable[..., tuple[dict, list]] | None = None
  pack_rows: int = 0
  stream_rows: int = 0


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
  packing, rows = c.data.get("packing", False), c.data.get("pack_rows", 0)
  if not isinstance(packing, bool):
    raise ValueError(f"data.packing={packing!r} must be True (several examples per token row) "
                     "or False (one example per row).")
  if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
    raise ValueError(f"data.pack_rows={rows!r} must be an int >= 0 (token rows per packed "
                     "batch; 0 = the most any step of the run needs).")
  if c.data.get("row_stream", False) is not False and not (c.data.row_stream is True and packing):
    raise ValueError(f"data.row_stream={c.data.row_stream!r} must be True or False, and True needs "
                     "data.packing=True (it streams the packed rows).")
  if c.client.backend not in BACKENDS:
    raise ValueError(f"client.backend={c.client.backend!r} must be one of {BACKENDS}.")
  if c.client.backend == "chunked" and c.client.get("chunk_size", 0) < 1:
    raise ValueError("client.backend='chunked' needs client.chunk_size >= 1 (clients per chunk).")
  if c.model.dtype not in provider_lib.DTYPES:
    raise ValueError(f"model.dtype={c.model.dtype!r} must be one of {sorted(provider_lib.DTYPES)}.")
  if c.lora.scale_rule not in lora_lib.SCALE_RULES:
    raise ValueError(f"lora.scale_rule={c.lora.scale_rule!r} must be one of {lora_lib.SCALE_RULES}.")


def trainable_patterns(config: ml_collections.ConfigDict, provider, base_params) -> tuple[str, str]:
  """``(lora_pattern, dense_pattern)``: the parameters clients adapt by LoRA and those they train in full.

  ``lora.pattern`` (``''``: the provider's ``DEFAULT_PATTERN``) picks the LoRA targets;
  ``model.head`` decides the task head of a provider with a ``HEAD_PATTERN`` (unset: ``'lora'``):
  ``'lora'`` adds the head's kernel to the LoRA targets, ``'frozen'`` keeps the head as drawn
  (LoRA-A2's and FFA-LoRA's setting), ``'train'`` makes it a dense trainable that every client
  trains and the server FedAvgs (:mod:`hetlora.dense`, like PEFT's ``modules_to_save``).

  Raises:
    ValueError: naming ``model.head`` (unknown, or set for a model without a head) or
      ``lora.pattern`` (it selects a head that is not ``'lora'``).
  """
  pattern = config.lora.pattern or provider.DEFAULT_PATTERN
  head = config.model.get("head")
  head_pattern = getattr(provider, "HEAD_PATTERN", None)
  if head_pattern is None:
    if head:
      raise ValueError(f"model.head={head!r}: model.kind={config.model.kind!r} has no task head to train; "
                       "unset model.head (None).")
    return pattern, ""
  head = head or "lora"
  if head not in HEADS:
    raise ValueError(f"model.head={head!r} must be one of {HEADS}: 'lora' adapts the head by LoRA, 'frozen' "
                     "keeps it as drawn, 'train' trains it in every client (FedAvg'd).")
  if head == "lora":
    return f"(?:{pattern})|(?:{head_pattern})", ""
  adapted = [p for p in dense_lib.paths(dense_lib.select(base_params, head_pattern))
             if p.endswith("/kernel") and re.search(pattern, p)]
  if adapted:
    raise ValueError(f"lora.pattern={pattern!r} selects the head's {adapted}, which model.head={head!r} "
                     f"{'keeps frozen' if head == 'frozen' else 'trains in full'}; drop the head from "
                     "lora.pattern, or set model.head='lora'.")
  return pattern, head_pattern if head == "train" else ""


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


def source_options(config: ml_collections.ConfigDict, field: str) -> dict[str, Any]:
  """The options of ``config.data.<field>`` (``source_kwargs`` or ``test_kwargs``) that are set.

  Every data-source option is a declared field of those sections (``configs/common.py``), ``None``
  meaning "not set" (the source's default); a set option the source does not take is an error.
  """
  d = config.data
  section = d.get(field)
  options = {k: v for k, v in (dict(section) if section else {}).items() if v is not None}
  params = inspect.signature(data_lib.SOURCES[d.source]).parameters
  unknown = sorted(k for k in options if k not in params)
  if unknown:
    raise ValueError(f"data.{field} sets {unknown}, which data.source={d.source!r} does not take; unset "
                     f"them (its options: {sorted(params)}).")
  return options


def load_sources(config: ml_collections.ConfigDict):
  """Untokenized ``(train, test, public or None)`` data sets of ``config.data``.

  The test data takes ``data.source_kwargs`` updated by the options set in
  ``data.test_kwargs`` (``split`` defaults to ``'train'`` / ``'test'``). Class
  labels follow the training data's label map (a test label the training data
  lacks is an error, :func:`hetlora.data.align_labels`).
  ``max_train_examples`` / ``max_test_examples`` take seeded subsamples; the
  public set (``public_examples``, for server-side distillation) is held out of the training set,
  so it is disjoint from every client.
  """
  d = config.data
  kwargs = source_options(config, "source_kwargs")
  test_only = source_options(config, "test_kwargs")
  test_kwargs = {**{k: v for k, v in kwargs.items() if k != "split"}, **test_only}
  if "split" in inspect.signature(data_lib.SOURCES[d.source]).parameters:
    train_ds = data_lib.get_source(d.source, **{"split": "train", **kwargs})
    test_ds = data_lib.get_source(d.source, **{"split": "test", **test_kwargs})
  elif "path" not in test_only:
    raise ValueError(f"data.source={d.source!r} has no splits: set data.test_kwargs.path to the held-out "
                     "file (otherwise the test data would be the training data).")
  else:
    train_ds = data_lib.get_source(d.source, **kwargs)
    test_ds = data_lib.get_source(d.source, **test_kwargs)
  if isinstance(train_ds, data_lib.TextDataset) and isinstance(test_ds, data_lib.TextDataset):
    where = (f"test file {str(test_kwargs['path'])!r} (data.test_kwargs.path)" if "path" in test_kwargs
             else f"test split of data.source={d.source!r} ({test_kwargs})")
    test_ds = data_lib.align_labels(test_ds, train_ds.label_names, where)
  train_ds = _subsample(train_ds, d.max_train_examples, config.seed)
  test_ds = _subsample(test_ds, d.max_test_examples, config.seed + 1)
  public_ds = None
  if d.public_examples:
    order = np.random.default_rng([config.seed, 7]).permutation(len(train_ds))
    public_ds = train_ds.select(np.sort(order[:d.public_examples]))
    train_ds = train_ds.select(np.sort(order[d.public_examples:]))
  return train_ds, test_ds, public_ds


def hold_out_tasks(config: ml_collections.ConfigDict, train_ds, test_ds, public_ds=None):
  """``(train, test, public, unseen or None)`` with the tasks of ``data.unseen_tasks`` held out.

  The held-out tasks' instances leave the training, test and public sets (task ids renumbered
  over the remaining tasks, so a natural partition has one client per seen task); their test
  instances are the ``unseen`` set.

  Raises:
    ValueError: naming ``data.unseen_tasks``, for classification data or unknown task names.
  """
  names = list(config.data.get("unseen_tasks") or ())
  if not names:
    return train_ds, test_ds, public_ds, None
  if not isinstance(train_ds, data_lib.PromptDataset):
    raise ValueError(f"data.unseen_tasks={names} holds out tasks of instruction data, but data.source="
                     f"{config.data.source!r} gives {type(train_ds).__name__}; set data.unseen_tasks=().")
  unknown = [n for n in names if n not in train_ds.task_names]
  if unknown:
    raise ValueError(f"data.unseen_tasks names {unknown}, which the data does not hold; choose among "
                     f"{list(train_ds.task_names)}.")
  if len(set(names)) == len(train_ds.task_names):
    raise ValueError(f"data.unseen_tasks holds out all {len(names)} tasks, so no client has data; set "
                     "data.unseen_tasks to fewer tasks.")
  public = public_ds.without_tasks(names) if public_ds is not None else None
  return train_ds.without_tasks(names), test_ds.without_tasks(names), public, test_ds.only_tasks(names)


def make_generation_eval(config: ml_collections.ConfigDict, loaded, sets: dict[str, Any],
                         seen: list[Any]) -> Callable[..., tuple[dict, list]] | None:
  """The provider's generation evaluator of ``sets`` (``{'test': ds, 'unseen': ds or None}``), or ``None``.

  ``None`` when the model does not generate or ``eval.generate_examples`` is 0. Exact
  match counts the classification-like tasks (:func:`hetlora.models.generation.classification_tasks`
  over the examples of ``seen`` and ``sets``), or every example with ``eval.answer_marker``.
  """
  e = config.eval
  limit = e.get("generate_examples", 0)
  if loaded.generation_eval is None or not limit:
    return None
  if not isinstance(limit, int) or limit < 0:
    raise ValueError(f"eval.generate_examples={limit!r} must be an int >= 0 (prompts answered per "
                     "evaluation set; 0 = no generation).")
  datasets = [ds for ds in [*seen, *sets.values()] if ds is not None]
  classification = generation_lib.classification_tasks(
      [t for ds in datasets for t in ds.targets],
      [ds.task_names[i] for ds in datasets for i in ds.task_ids])
  return loaded.generation_eval(
      {name: ds for name, ds in sets.items() if ds is not None and len(ds)},
      max_new_tokens=e.get("max_new_tokens", 32), batch_size=e.batch_size, max_examples=limit,
      classification=sorted(classification), marker=e.get("answer_marker") or None,
      samples_per_task=e.get("samples_per_task", 2))


def make_choice_eval(config: ml_collections.ConfigDict, loaded,
                     sets: dict[str, Any]) -> Callable[..., tuple[dict, list]] | None:
  """The provider's multiple-choice evaluator of ``sets`` (``{'test': ds, 'unseen': ds or None}``), or ``None``.

  ``None`` when the model scores no options or the test data has none (``PromptDataset.choices``).
  Up to ``eval.choice_examples`` examples of each set (tasks in turn; 0 = all) are scored.
  """
  e = config.eval
  limit = e.get("choice_examples", 0)
  if loaded.choice_eval is None or getattr(sets["test"], "choices", None) is None:
    return None
  if not isinstance(limit, int) or limit < 0:
    raise ValueError(f"eval.choice_examples={limit!r} must be an int >= 0 (multiple-choice examples scored "
                     "per evaluation set; 0 = all).")
  return loaded.choice_eval({name: ds for name, ds in sets.items() if ds is not None and len(ds)},
                            batch_size=e.batch_size, max_examples=limit,
                            samples_per_task=e.get("samples_per_task", 2))


def _partition(config, labels: np.ndarray) -> list[np.ndarray]:
  """Client index arrays; ``labels`` are class labels (or task ids, the natural key of prompts)."""
  d = config.data
  if d.partition == "natural":
    partition = data_lib.make_partition("natural", keys=labels)
    if len(partition) != d.num_clients:
      raise ValueError(f"data.partition='natural' gives one client per key ({len(partition)} here), but "
                       f"data.num_clients={d.num_clients}; set data.num_clients={len(partition)}.")
    return partition
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


def make_privacy(config: ml_collections.ConfigDict) -> privacy_lib.Privacy | None:
  """Client-level DP from ``config.privacy`` (``None`` when ``noise_multiplier`` is 0)."""
  p = config.privacy
  if not p.noise_multiplier:
    return None
  return privacy_lib.Privacy(p.noise_multiplier, config.client.clip_norm, p.delta)


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
  provider = provider_lib.get(config.model.kind)
  train_ds, test_ds, public_ds = load_sources(config)
  train_ds, test_ds, public_ds, unseen_ds = hold_out_tasks(config, train_ds, test_ds, public_ds)
  classes = provider.TASK == "classification"
  label_names = list(train_ds.label_names) if classes else []
  key = jax.random.key(config.seed)
  head_key, lora_key = jax.random.split(key)
  loaded = provider.load(config.model, num_labels=len(label_names) if classes else None, key=head_key)
  train, test = loaded.prepare(train_ds), loaded.prepare(test_ds)
  public = loaded.prepare(public_ds) if public_ds is not None else None
  unseen = loaded.prepare(unseen_ds) if unseen_ds is not None else None
  generation_eval = make_generation_eval(config, loaded, {"test": test_ds, "unseen": unseen_ds}, [train_ds])
  choice_eval = make_choice_eval(config, loaded, {"test": test_ds, "unseen": unseen_ds})

  partition = _partition(config, train["label"] if classes else train["task_id"])
  client_ranks = ranks_lib.assign(config.data.num_clients, config.seed, config.lora.r_min,
                                  config.lora.r_max, tuple(config.lora.rank_choices),
                                  config.lora.rank_distribution)
  pattern, dense_pattern = trainable_patterns(config, provider, loaded.base_params)
  global_lora = lora_lib.init(lora_key, loaded.base_params, pattern, config.lora.r_max)
  if config.lora.get("init_from"):
    global_lora = peft_export.initial_adapter(config, global_lora)
  run = methods_lib.Run(
      client_ranks=client_ranks, clients_per_round=config.server.clients_per_round,
      r_min=config.lora.r_min, r_max=config.lora.r_max, alpha=config.lora.alpha,
      scale_rule=config.lora.scale_rule, logits_fn=loaded.logits_fn, has_public=public is not None)
  method = methods_lib.build(config.method.name, run, config.method.kwargs.to_dict())
  spec = client_lib.LocalSpec(
      loss_fn=loaded.loss_fn, optimizer=make_optimizer(config.client),
      alpha=config.lora.alpha, scale_rule=config.lora.scale_rule, local=method.local, dense=dense_pattern)
  if config.client.local_steps:
    steps = int(config.client.local_steps)
  else:
    steps = data_lib.epoch_steps([len(ix) for ix in partition], config.client.batch_size,
                                 config.client.local_epochs)
  return Experiment(
      config=config, base_params=loaded.base_params, logits_fn=loaded.logits_fn,
      eval_sums=loaded.eval_sums, spec=spec, method=method,
      round_fn=server.make_round(spec, method, backend=make_backend(config.client, spec),
                                 screening=screening_lib.Screening(config.server.max_update_norm,
                                                                   config.client.clip_norm),
                                 privacy=make_privacy(config)),
      global_lora=global_lora,
      init_state=server.init(global_lora, client_ranks, method,
                             dense=dense_lib.select(loaded.base_params, dense_pattern)),
      train=train, test=test, partition=partition,
      public=_public_batches(public, config.client.batch_size), steps=steps, label_names=label_names,
      unseen=unseen, generation_eval=generation_eval, choice_eval=choice_eval,
      pack_rows=pack_rows(config, train, partition, steps),
      stream_rows=stream_rows(config, train, partition, steps))


def _cohort_options(config: ml_collections.ConfigDict, partition, cohort, round_index: int, steps: int):
  """The arguments of :func:`hetlora.data.pack_cohort` / ``cohort_indices`` for one round."""
  c = config.client
  return dict(client_indices=[partition[i] for i in cohort], batch_size=c.batch_size,
              local_epochs=c.local_epochs or None, local_steps=c.local_steps or None, seed=config.seed,
              round_idx=round_index, client_ids=cohort, pad_steps_to=steps)


def _run_slots(config: ml_collections.ConfigDict, partition, steps: int) -> np.ndarray:
  """Every round's cohort slots, ``int64[rounds, K, steps, B]`` (``server.sample_cohort`` for rounds
  ``0 .. server.rounds - 1``)."""
  d = config.data
  return np.stack([data_lib.cohort_indices(**_cohort_options(
      config, partition, server.sample_cohort(config.seed, r, d.num_clients, config.server.clients_per_round),
      r, steps)) for r in range(config.server.rounds)])


def pack_rows(config: ml_collections.ConfigDict, train: dict[str, np.ndarray], partition, steps: int) -> int:
  """Token rows per packed batch: 0 without ``data.packing``, else ``data.pack_rows`` or, when 0,
  the most rows any local step of the run's cohorts packs into
  (:func:`hetlora.data.segments.rows_needed`)."""
  d = config.data
  if not d.get("packing", False):
    return 0
  if d.get("pack_rows", 0):
    return int(d.pack_rows)
  return segments_lib.rows_needed(train, _run_slots(config, partition, steps))


def stream_rows(config: ml_collections.ConfigDict, train: dict[str, np.ndarray], partition, steps: int) -> int:
  """Rows of each client's row stream: 0 without ``data.row_stream``, else the most non-empty
  packed rows any client of the run's cohorts holds in a round
  (:func:`hetlora.data.row_stream.stream_length`)."""
  if not config.data.get("row_stream", False):
    return 0
  return row_stream_lib.stream_length(train, _run_slots(config, partition, steps))


def cohort_data(exp: Experiment, cohort: np.ndarray, round_index: int):
  """Host-packed ``({'batch', 'mask'}, num_examples)`` of ``cohort`` for ``round_index``
  (several examples per token row when ``exp.pack_rows``)."""
  packed = data_lib.pack_cohort(exp.train, rows=exp.pack_rows or None,
                                **_cohort_options(exp.config, exp.partition, cohort, round_index, exp.steps))
  n = packed.pop("num_examples")
  mask = packed.pop("mask")
  if exp.stream_rows:
    return row_stream_lib.to_stream({"batch": packed, "mask": mask}, exp.stream_rows), n
  return {"batch": packed, "mask": mask}, n
