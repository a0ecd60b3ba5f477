"""A site's long-lived worker: the built experiment and compiled local training kept between messages.

Flower's SuperNode starts a new ``ClientApp`` process for every message. On
its own, each such process imports JAX, builds the experiment (model,
tokenized data, partition) and loads the compiled local training again:
tens of seconds per message for MiniLM, more than the training itself. A
site can instead run this worker beside its SuperNode and name its socket in
the node config (``site-worker='/path/site.sock'``): the ``ClientApp`` then
hands each ``train`` message's content to the worker and returns its reply.
The worker answers with the same function (:func:`hetlora.flower.site.answer`,
so the same numbers) and keeps what :func:`hetlora.flower.site.build` made
for the run's config in memory.

Transport: a Unix socket (:mod:`multiprocessing.connection`), local to the
site's machine, with a random key in ``<socket>.key`` (mode 0600, so only the
site's user can connect); the content travels as Flower's own protobuf
serialisation of the ``RecordDict``. One message is trained at a time;
others wait for the socket. An error in training is sent back and raised in
the ``ClientApp`` (the server counts that client as missing for the round);
the worker goes on serving.

Command (a site, beside ``launch/flower/supernode.sh``; its node config gets
``site-worker='/var/lib/hetlora/site.sock'``)::

    python -m hetlora.flower.site_worker --socket /var/lib/hetlora/site.sock
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from multiprocessing import connection
from pathlib import Path
from typing import Any, Mapping

from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

log = logging.getLogger(__name__)
START = "python -m hetlora.flower.site_worker --socket {path}"


def key_file(socket_path: str | os.PathLike) -> Path:
  """Where the worker of ``socket_path`` keeps its connection key."""
  return Path(f"{socket_path}.key")


def _to_bytes(content) -> bytes:
  return serde.recorddict_to_proto(content).SerializeToString()


def _from_bytes(data: bytes):
  proto = ProtoRecordDict()
  proto.ParseFromString(data)
  return serde.recorddict_from_proto(proto)


def ask(socket_path: str, content, node_config: Mapping[str, Any]):
  """The worker's reply content to a ``train`` message's ``content`` (a ``RecordDict``).

  Raises:
    RuntimeError: no worker serves ``socket_path`` (the message says how to start one), or the
      worker's training raised (its error and traceback are in the message).
  """
  try:
    key = key_file(socket_path).read_bytes()
    conn = connection.Client(str(socket_path), family="AF_UNIX", authkey=key)
  except (FileNotFoundError, ConnectionRefusedError) as e:
    raise RuntimeError(f"no site worker serves {socket_path!r} (node config site-worker): {e}. Start one with "
                       f"`{START.format(path=socket_path)}` or remove site-worker from the node config.") from e
  with conn:
    conn.send((dict(node_config), _to_bytes(content)))
    status, payload = conn.recv()
  if status != "ok":
    raise RuntimeError(f"site worker {socket_path!r} failed: {payload}")
  return _from_bytes(payload)


def _claim(path: Path) -> None:
  """Removes a socket file no process listens on; refuses one that a live worker serves."""
  if not path.exists():
    return
  try:
    key = key_file(path).read_bytes()
    connection.Client(str(path), family="AF_UNIX", authkey=key).close()
  except (FileNotFoundError, ConnectionRefusedError):   # no key, or nobody listens: left by a dead worker
    path.unlink()
    return
  except connection.AuthenticationError:                 # someone listens, with another key
    pass
  raise RuntimeError(f"another site worker serves {str(path)!r}; stop it or choose another --socket.")


def _write_key(path: Path) -> bytes:
  key = os.urandom(32)
  fd = os.open(key_file(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, "wb") as f:
    f.write(key)
  return key


def _handle(conn: connection.Connection, answer) -> None:
  try:
    node_config, data = conn.recv()
  except (EOFError, ConnectionError):
    return    # a probe (another worker checking the socket, stop_serving) or a ClientApp that died
  try:
    t0 = time.perf_counter()
    content = _from_bytes(data)
    reply = ("ok", _to_bytes(answer(content, node_config)))
    log.info("trained clients %s in %.2f s", list(content["task"]["clients"]), time.perf_counter() - t0)
  except Exception as e:  # noqa: BLE001 - sent back to the ClientApp, which raises it
    log.exception("training failed")
    reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
  try:
    conn.send(reply)
  except (BrokenPipeError, ConnectionError):
    log.warning("the ClientApp went away before the reply; its client counts as missing this round")


def serve(socket_path: str | os.PathLike, stop: threading.Event | None = None) -> None:
  """Answers ``train`` contents on ``socket_path`` until ``stop`` is set (or SIGTERM / SIGINT).

  Raises:
    RuntimeError: another worker serves ``socket_path``.
  """
  from hetlora.flower import site
  path = Path(socket_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _claim(path)
  key = _write_key(path)
  stop = stop or threading.Event()
  with connection.Listener(str(path), family="AF_UNIX", authkey=key) as listener:
    log.info("site worker serving %s", path)
    try:
      while not stop.is_set():
        try:
          conn = listener.accept()
        except connection.AuthenticationError:
          log.warning("refused a connection with a wrong key on %s", path)
          continue
        except OSError:
          if stop.is_set():
            break
          raise
        with conn:
          if stop.is_set():
            break
          _handle(conn, site.answer)
    finally:
      with contextlib.suppress(FileNotFoundError):
        key_file(path).unlink()


def stop_serving(socket_path: str | os.PathLike, stop: threading.Event) -> None:
  """Sets ``stop`` and wakes a :func:`serve` blocked in ``accept`` (for a worker run in a thread)."""
  stop.set()
  with contextlib.suppress(OSError, connection.AuthenticationError, EOFError):
    connection.Client(str(socket_path), family="AF_UNIX", authkey=key_file(socket_path).read_bytes()).close()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--socket", required=True, help="the Unix socket to serve (the node config's site-worker)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

  def terminate(signum, frame):
    del frame
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, terminate)
  serve(args.socket)


if __name__ == "__main__":
  main()
