"""The Flower ``ClientApp``: a site answers which clients it holds and trains them.

Two message types (the server's side is :mod:`hetlora.flower.strategy`):

- ``query``: replies ``{'site': ConfigRecord(client_ids=[...])}`` from the
  SuperNode's ``--node-config`` (:func:`hetlora.flower.site.client_ids`);
- ``train``: content ``adapter`` (the client's ``r_k`` slots), ``dense`` and
  ``kernels`` (ArrayRecords, possibly empty) and ``task`` (ConfigRecord:
  ``client``, ``round``, ``rank``, ``config`` JSON); replies ``adapter`` (the
  trained slots at the new rank), ``dense`` and ``metrics`` (MetricRecord:
  ``client``, ``rank``, ``loss``, ``examples``, ``update_norm``, ``num_examples``).

An exception becomes Flower's error reply; the server counts the client as
missing for that round (its upload gets no weight, its rank is kept).

Example (``pyproject.toml`` of a Flower App, ``launch/flower/``)::

    [tool.flwr.app.components]
    clientapp = "hetlora.flower.client_app:app"
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hetlora.flower import site
from hetlora.flower import wire

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
  """The clients this site holds."""
  ids = site.client_ids(context.node_config)
  return Message(RecordDict({"site": ConfigRecord({"client_ids": ids})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
  """One client's local training on the site's partition."""
  task = msg.content["task"]
  client, rank = int(task["client"]), int(task["rank"])
  if client not in site.client_ids(context.node_config):
    raise ValueError(f"this site does not hold client {client} (its node config: {context.node_config}).")
  site.use_xla_cache(context.node_config)
  exp, train_one = site.build(str(task["config"]), str(context.node_config.get("model-dir", "")))
  start = wire.adapter_from_record(msg.content["adapter"], exp.global_lora, rank)
  result, num_examples = site.train(exp, train_one, client, int(task["round"]), rank, start,
                                    wire.tree_from_record(msg.content["dense"]),
                                    wire.tree_from_record(msg.content["kernels"]))
  new_rank = int(result.rank)
  content = RecordDict({
      "adapter": wire.adapter_record(result.lora, new_rank, exp.method.local.trainable),
      "dense": wire.tree_record(result.dense) if result.dense else ArrayRecord(),
      "metrics": MetricRecord({
          "client": client, "rank": new_rank, "loss": float(result.loss),
          "examples": float(result.examples), "update_norm": float(result.update_norm),
          "num_examples": num_examples}),
  })
  return Message(content, reply_to=msg)
