"""A client site: its own model copy and data partition, its cohort clients' local training per message.

The server sends the run's config (JSON) with every training message; the
site builds the experiment from it (:func:`hetlora.experiment.build`: the
model, the tokenized data, the partition, the method's local rule) with its
own settings from the SuperNode's ``--node-config``:

- ``partition-id`` (int) or ``client-ids`` (``'0,5,10'``): the clients whose
  partitions this site holds and trains;
- ``model-dir`` (optional): the site's copy of the model (``config.model.name``);
- ``xla-cache`` (optional): a folder for compiled programs, so a new
  ``ClientApp`` process (one per message) reuses the compiled local training;
- ``site-worker`` (optional): the Unix socket of the site's long-lived worker
  (:mod:`hetlora.flower.site_worker`), which keeps the built experiment and
  the compiled local training between messages.

One round for client ``k`` at rank ``r_k`` (:func:`train`; :func:`answer`
does it for each of the message's clients)::

    start  = pad(received slots, r_max)                  a: [d_in, r_max]
    base   = W0 with the received dense trainables (and changed kernels)
    data   = cohort_data(exp, [k], round)                [1, steps, B, ...]
    result = local_train(spec, base, start, r_k, data)   (the sequential backend, hetlora.client)

the same function, data and numbers as the in-process simulation. Nothing of
the site's data leaves it; the reply holds the trained slots at the new rank,
the dense trainables, and the numbers (:mod:`hetlora.flower.wire`).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from hetlora import client as client_lib
from hetlora import dense as dense_lib
from hetlora import experiment as experiment_lib
from hetlora import lora as lora_lib
from hetlora.flower import wire
from hetlora.flower.node import client_ids


def site_config(config_json: str, node_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The run's config as the server sent it, with the site's ``model-dir`` if set."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  if node_config.get("model-dir"):
    config.model.name = str(node_config["model-dir"])
  return config


def use_xla_cache(node_config: Mapping[str, Any]) -> None:
  """Compiled programs persist in ``xla-cache`` (unless ``JAX_COMPILATION_CACHE_DIR`` is set)."""
  folder = node_config.get("xla-cache")
  if folder and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@functools.lru_cache(maxsize=2)
def build(config_json: str, model_dir: str) -> tuple[experiment_lib.Experiment, Any]:
  """``(experiment, train_one)`` for a config; cached, so a process that serves many messages
  (Flower's simulation engine) builds and compiles once."""
  exp = experiment_lib.build(site_config(config_json, {"model-dir": model_dir}))
  return exp, client_lib.make_backend("sequential", exp.spec)


def train(exp: experiment_lib.Experiment, train_one, client: int, round_index: int, rank: int,
          start: lora_lib.LoRA, dense: Any, kernels: Any) -> tuple[client_lib.ClientResult, float]:
  """Client ``client``'s local training of round ``round_index``; ``(result, num_examples)``.

  Args:
    exp: the site's experiment (:func:`build`).
    train_one: the sequential backend of ``exp.spec`` (:func:`hetlora.client.sequential_backend`:
      the in-process per-client program; a non-finite loss raises, naming the client).
    client: the client id; its partition must be one of ``exp.partition``.
    round_index: the 0-based round (seeds the client's data order).
    rank: the client's rank ``r_k``.
    start: its starting tree padded to ``r_max``.
    dense: the global dense trainables (``{}``: none).
    kernels: adapted kernels the method changed (FLoRA's merged base; ``{}``: none).

  Raises:
    ValueError: naming the client id when the config has no such client.
  """
  if not 0 <= client < len(exp.partition):
    raise ValueError(f"client id {client} is outside data.num_clients={len(exp.partition)}; check the "
                     "SuperNode's --node-config partition-id / client-ids.")
  data, n = experiment_lib.cohort_data(exp, np.asarray([client], np.int32), round_index)
  base = dense_lib.overlay(dense_lib.overlay(exp.base_params, kernels), dense)
  stacked = train_one(base, jax.tree.map(lambda x: x[None], start), np.asarray([rank], np.int32), data)
  return jax.tree.map(lambda x: x[0], jax.device_get(stacked)), float(n[0])


def answer(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
  """The reply content to a ``train`` message's content (:mod:`hetlora.flower.client_app` has the records).

  A message carries every cohort client this site holds (one message per SuperNode and round);
  they train one after the other, each exactly as in :func:`train`.

  Args:
    content: the message's ``RecordDict``: ``task`` (``clients``, ``ranks``, ``round``,
      ``config``), ``dense``, ``kernels`` and ``adapter.<client>`` for each client.
    node_config: the SuperNode's ``--node-config``.

  Returns:
    A ``RecordDict`` with, for each client, ``adapter.<client>`` (the trained slots at the new
    rank), ``dense.<client>`` and ``metrics.<client>``.

  Raises:
    ValueError: the site does not hold one of the task's clients (checked before any training).
  """
  task = content["task"]
  clients, ranks = [int(c) for c in task["clients"]], [int(r) for r in task["ranks"]]
  foreign = sorted(set(clients) - set(client_ids(node_config)))
  if foreign:
    raise ValueError(f"this site does not hold client {', '.join(map(str, foreign))} "
                     f"(its node config: {dict(node_config)}).")
  use_xla_cache(node_config)
  exp, train_one = build(str(task["config"]), str(node_config.get("model-dir", "")))
  dense, kernels = wire.tree_from_record(content["dense"]), wire.tree_from_record(content["kernels"])
  reply = RecordDict()
  for client, rank in zip(clients, ranks):
    start = wire.adapter_from_record(content[wire.client_key("adapter", client)], exp.global_lora, rank)
    result, num_examples = train(exp, train_one, client, int(task["round"]), rank, start, dense, kernels)
    new_rank = int(result.rank)
    reply[wire.client_key("adapter", client)] = wire.adapter_record(result.lora, new_rank,
                                                                    exp.method.local.trainable)
    reply[wire.client_key("dense", client)] = wire.tree_record(result.dense) if result.dense else ArrayRecord()
    reply[wire.client_key("metrics", client)] = MetricRecord({
        "client": client, "rank": new_rank, "loss": float(result.loss),
        "examples": float(result.examples), "update_norm": float(result.update_norm),
        "num_examples": num_examples})
  return reply
