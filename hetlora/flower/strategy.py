"""The server's round over a Flower grid: the library's server steps, clients on SuperNodes.

One round (``play_round(exp)`` for :func:`hetlora.trainer.run`)::

    ranks, base, start = prepare(state, W0, cohort, key)        (hetlora.server.make_steps)
    message(node) = {start[k][:, :r_k] for its cohort clients k}  (hetlora.flower.wire)
    replies = exchange(grid, messages, round_timeout)          (Flower Message API)
    result  = stack(pad(reply_k, r_max))                       [K, ..., r_max]
    state, result = finish(state, base, cohort, ranks, start, result, n, key, public)

Each SuperNode gets one message a round holding all its cohort clients: a
SuperNode takes its messages one at a time, each through a new
``ClientApp`` process, so a message per client would queue a site's
clients behind each other's start-up. Sampling
(:func:`hetlora.server.sample_cohort`), distribution, screening, the
method's jitted aggregation and the server update are the in-process
simulation's own functions: the same seed, cohorts and data give the same
global adapter. A client whose reply does not come back (its SuperNode
left, its ``ClientApp`` raised, or ``round_timeout`` passed), or whose
site's reply lacks its records, is **missing**:
it counts as an excluded upload (no weight, its rank kept, the round
aggregates the others; with none left the state is kept), is logged, and
the round's metrics record ``missing`` and ``missing_clients``. Metrics also
record ``bytes_down`` / ``bytes_up`` per cohort client (array payloads).

SuperNodes announce their clients in reply to a ``query`` message
(:mod:`hetlora.flower.client_app`); the server asks every node it has not
asked yet before each round, so a SuperNode that joins (or rejoins) later
is used from the next round on.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from hetlora import client as client_lib
from hetlora import dense as dense_lib
from hetlora import experiment as experiment_lib
from hetlora import lora as lora_lib
from hetlora import screening as screening_lib
from hetlora import server
from hetlora import trainer
from hetlora.flower import wire
from hetlora.methods import base as method_base


@dataclasses.dataclass(frozen=True)
class Options:
  """How the server talks to its SuperNodes (``[tool.flwr.app.config]`` of the Flower App).

  Attributes:
    round_timeout: seconds a round waits for replies; later ones are missing.
    min_nodes: SuperNodes to wait for before the first round.
    node_wait: seconds to wait for them (then the run starts with those connected).
    poll: seconds between pulls of replies.
  """
  round_timeout: float = 600.0
  min_nodes: int = 1
  node_wait: float = 120.0
  poll: float = 0.2


class Directory:
  """Which SuperNode holds which client: asked by ``query`` messages, refreshed every round."""

  def __init__(self, grid: Grid, options: Options):
    self.grid, self.options = grid, options
    self.node_of: dict[int, int] = {}
    self.asked: set[int] = set()

  def wait(self) -> None:
    """Blocks until ``min_nodes`` SuperNodes are connected or ``node_wait`` seconds passed."""
    end = time.monotonic() + self.options.node_wait
    while len(list(self.grid.get_node_ids())) < self.options.min_nodes and time.monotonic() < end:
      time.sleep(self.options.poll)

  def refresh(self) -> None:
    """Forgets nodes that left; asks the new ones which clients they hold."""
    nodes = set(self.grid.get_node_ids())
    self.node_of = {c: n for c, n in self.node_of.items() if n in nodes}
    self.asked &= nodes
    new = sorted(nodes - self.asked)
    if not new:
      return
    messages = [Message(RecordDict({"query": ConfigRecord({})}), dst_node_id=n, message_type="query")
                for n in new]
    replies, _ = exchange(self.grid, messages, self.options.round_timeout, self.options.poll)
    for node, reply in zip(new, replies):
      if reply is None or reply.has_error():
        logging.warning("SuperNode %d did not say which clients it holds (%s); asking again next round.",
                        node, "no reply" if reply is None else reply.error.reason)
        continue
      self.asked.add(node)
      for client in reply.content["site"]["client_ids"]:
        if self.node_of.get(int(client), node) != node:
          logging.warning("client %d is held by SuperNodes %d and %d; using %d.", client,
                          self.node_of[int(client)], node, node)
        self.node_of[int(client)] = node


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float
             ) -> tuple[list[Message | None], float]:
  """Sends ``messages`` and pulls their replies, in order (``None``: none within ``timeout``).

  The grid is pulled at least once after the push, so replies that are already there when
  ``timeout`` has passed (a slow push, a loaded host) are not counted missing.

  Returns the replies and the seconds waited.
  """
  t0 = time.monotonic()
  ids = list(grid.push_messages(messages))
  position = {i: k for k, i in enumerate(ids) if i}
  replies: list[Message | None] = [None] * len(messages)
  while position:   # pulls at least once: replies already there when the time is up count
    for reply in grid.pull_messages(list(position)):
      replies[position.pop(reply.metadata.reply_to_message_id)] = reply
    if not position or time.monotonic() - t0 >= timeout:
      break
    time.sleep(poll)
  return replies, time.monotonic() - t0


def _slice(tree: Any, k: int) -> Any:
  return jax.tree.map(lambda x: x[k], tree)


def play_round(grid: Grid, options: Options = Options()):
  """``play_round(exp)`` for :func:`hetlora.trainer.run`: rounds played by the grid's SuperNodes."""

  def build(exp: experiment_lib.Experiment) -> trainer.PlayRound:
    config = exp.config
    prepare, finish = map(jax.jit, server.make_steps(
        exp.spec, exp.method, screening_lib.Screening(config.server.max_update_norm, config.client.clip_norm),
        experiment_lib.make_privacy(config)))
    config_json = config.to_json()
    parts = exp.method.local.trainable
    changes_base = exp.method.effective_base is not method_base.unchanged_base
    kernel_pattern = "|".join(f"^{re.escape(p)}/kernel$" for p in lora_lib.modules(exp.global_lora))
    directory = Directory(grid, options)
    directory.wait()

    def play(state, cohort, r, key):
      directory.refresh()
      ranks, base, start = prepare(state, exp.base_params, cohort, key)
      host_ranks, host_start = np.asarray(ranks), jax.device_get(start)
      dense = wire.tree_record(state.dense) if state.dense else ArrayRecord()
      kernels = (wire.tree_record(dense_lib.select(jax.device_get(base), kernel_pattern))
                 if changes_base else ArrayRecord())
      adapters, down, at_node = [], [], {}
      for k, client in enumerate(cohort.tolist()):
        adapters.append(wire.adapter_record(_slice(host_start, k), int(host_ranks[k])))
        down.append(wire.payload_bytes(adapters[k], dense, kernels))
        if client in directory.node_of:
          at_node.setdefault(directory.node_of[client], []).append(k)
      messages = []
      for node, positions in at_node.items():
        task = ConfigRecord({"clients": [int(cohort[k]) for k in positions],
                             "ranks": [int(host_ranks[k]) for k in positions],
                             "round": r, "config": config_json})
        content = RecordDict({"dense": dense, "kernels": kernels, "task": task, **{
            wire.client_key("adapter", cohort[k]): adapters[k] for k in positions}})
        messages.append(Message(content, dst_node_id=node, message_type="train", group_id=str(r + 1)))
      replies, _ = exchange(grid, messages, options.round_timeout, options.poll)
      by_position = {k: reply for positions, reply in zip(at_node.values(), replies) for k in positions}
      uploads, num_examples, up, missing = [], np.zeros(len(cohort), np.float32), [0] * len(cohort), {}
      for k, client in enumerate(cohort.tolist()):
        reply = by_position.get(k)
        keys = [wire.client_key(name, client) for name in ("adapter", "dense", "metrics")]
        reason = _why_missing(reply, k in by_position, keys)
        if reason:
          missing[client] = reason
          uploads.append(_missing(_slice(host_start, k), host_ranks[k], state.dense))
          continue
        adapter, dense_up, metrics = (reply.content[key] for key in keys)
        rank = int(metrics["rank"])
        lora = wire.adapter_from_record(adapter, _slice(host_start, k), rank,
                                        fallback_a=_slice(host_start, k) if parts == "b" else None)
        uploads.append(client_lib.ClientResult(
            lora=lora, rank=np.int32(rank), loss=np.float32(metrics["loss"]),
            examples=np.float32(metrics["examples"]), update_norm=np.float32(metrics["update_norm"]),
            dense=wire.tree_from_record(dense_up) if state.dense else {}))
        num_examples[k] = metrics["num_examples"]
        up[k] = wire.payload_bytes(adapter, dense_up)
      if missing:
        logging.warning("round %d: no upload from clients %s; the round aggregates the other %d.", r + 1,
                        {c: reason[:200] for c, reason in missing.items()}, len(cohort) - len(missing))
      result = jax.tree.map(lambda *xs: jnp.stack(xs), *uploads)
      state, result = finish(state, base, cohort, ranks, start, result, num_examples, key, exp.public)
      extra = {"missing": len(missing), "missing_clients": sorted(missing), "bytes_down": down, "bytes_up": up}
      return state, result, num_examples, extra

    return play

  return build


def _why_missing(reply: Message | None, sent: bool, keys: list[str]) -> str | None:
  """Why a cohort client's upload is not in ``reply`` (``None``: it is there).

  ``sent``: a message went to a SuperNode holding the client; ``keys``: its records in the reply.
  """
  if not sent:
    return "no SuperNode holds it"
  if reply is None:
    return "no reply"
  if reply.has_error():
    return reply.error.reason
  absent = [key for key in keys if key not in reply.content]
  return f"the site's reply lacks {absent}" if absent else None


def _missing(start: Any, rank: int, dense: Any) -> client_lib.ClientResult:
  """The upload of a client that sent none: what it received, a NaN loss (so screening excludes it)."""
  return client_lib.ClientResult(lora=start, rank=np.int32(rank), loss=np.float32(np.nan),
                                 examples=np.float32(0), update_norm=np.float32(0),
                                 dense=jax.device_get(dense) if dense else {})
