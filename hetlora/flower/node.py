"""A SuperNode's own settings (its ``--node-config``), read without JAX.

Keys: ``partition-id`` or ``client-ids`` (the clients the site holds),
``model-dir``, ``xla-cache``, ``site-worker`` (see :mod:`hetlora.flower.site`).
"""

from __future__ import annotations

from typing import Any, Mapping


def client_ids(node_config: Mapping[str, Any]) -> list[int]:
  """The client ids a SuperNode holds: ``client-ids`` (``'0,5'``) or ``partition-id`` (one id).

  Raises:
    ValueError: neither is set, or ``client-ids`` is not a comma-separated list of ints.
  """
  if "client-ids" in node_config:
    text = str(node_config["client-ids"])
    try:
      return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
      raise ValueError(f"node config client-ids={text!r} must be comma-separated ints, e.g. "
                       "'0,5,10'.") from None
  if "partition-id" in node_config:
    return [int(node_config["partition-id"])]
  raise ValueError("the SuperNode holds no client: start it with --node-config 'partition-id=<k>' "
                   "(or 'client-ids=\"<k1>,<k2>\"').")
