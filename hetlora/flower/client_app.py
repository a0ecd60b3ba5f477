"""The Flower ``ClientApp``: a site answers which clients it holds and trains them.

Two message types (the server's side is :mod:`hetlora.flower.strategy`):

- ``query``: replies ``{'site': ConfigRecord(client_ids=[...])}`` from the
  SuperNode's ``--node-config`` (:func:`hetlora.flower.node.client_ids`);
- ``train``: one message a round for all the cohort clients the site holds;
  content ``task`` (ConfigRecord: ``clients``, ``ranks``, ``round``,
  ``config`` JSON), ``dense`` and ``kernels`` (ArrayRecords, possibly empty)
  and ``adapter.<client>`` (each client's ``r_k`` slots); replies, per
  client, ``adapter.<client>`` (the trained slots at the new rank),
  ``dense.<client>`` and ``metrics.<client>`` (MetricRecord: ``client``,
  ``rank``, ``loss``, ``examples``, ``update_norm``, ``num_examples``).

With ``site-worker=<socket>`` in the node config, the message's content goes to
the site's long-lived worker (:mod:`hetlora.flower.site_worker`), which
answers with the same function (:func:`hetlora.flower.site.answer`) but keeps
the experiment and compiled program between messages; otherwise this process
builds them itself.

An exception (also an unreachable site worker) becomes Flower's error reply;
the server counts the message's clients as missing for that round (its upload gets no
weight, its rank is kept).

Example (``pyproject.toml`` of a Flower App, ``launch/flower/``)::

    [tool.flwr.app.components]
    clientapp = "hetlora.flower.client_app:app"
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hetlora.flower import node, site_worker

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
  """The clients this site holds."""
  ids = node.client_ids(context.node_config)
  return Message(RecordDict({"site": ConfigRecord({"client_ids": ids})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
  """The local training of the site's cohort clients (in the site's worker, or here)."""
  if context.node_config.get("site-worker"):
    content = site_worker.ask(str(context.node_config["site-worker"]), msg.content, context.node_config)
  else:
    from hetlora.flower import site   # JAX and the experiment: only where this process trains
    content = site.answer(msg.content, context.node_config)
  return Message(content, reply_to=msg)
