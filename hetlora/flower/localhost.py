"""A Flower deployment on this machine: a SuperLink and SuperNodes as separate processes.

The deployment engine as a site would run it, on localhost and without TLS
(``--insecure``): :func:`federation` starts ``flower-superlink`` and one
``flower-supernode`` per node config (each its own clients and XLA cache),
:func:`run_app` submits the Flower App ``launch/flower`` with ``flwr run``
and waits for it to finish. Every process logs to ``<root>/logs/``; Flower's
own state (installed apps, the CLI's connection) lives in ``<root>/flwr``.

Command (3 sites, the tweets smoke run)::

    python -m hetlora.flower.localhost --root /tmp/fed --nodes 3 --site-workers \\
        --config configs/tweets_hetlora.py:runlocal --workdir /tmp/fed/workdir

Example::

    with federation(Path('/tmp/fed'), [{'partition-id': 0}, {'partition-id': 1}]) as fed:
      run_app(fed, {'config': 'configs/tweets_hetlora.py:runlocal', 'workdir': '/tmp/fed/w', 'min-nodes': 2})
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import tomli_w

APP = Path(__file__).resolve().parents[2] / "launch" / "flower"


@dataclasses.dataclass
class Federation:
  """The running processes: ``superlink``, ``nodes`` (one per node config), their site ``workers``
  (empty without ``site_workers``), their environment."""
  root: Path
  env: dict[str, str]
  superlink: subprocess.Popen
  nodes: list[subprocess.Popen]
  workers: list[subprocess.Popen] = dataclasses.field(default_factory=list)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _node_config(config: Mapping[str, Any]) -> str:
  """``--node-config`` text: ``key=value`` pairs, strings quoted."""
  return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())


class FederationError(RuntimeError):
  """A process of the local federation failed; the message ends with the tails of its logs."""


# Run before the command, in its own process: on Linux, asks for SIGTERM when the parent (the process
# that started the federation) dies, exits if it is already gone, then becomes the command. (Done after
# exec, not in a preexec_fn, which would fork a multithreaded JAX process.)
_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                "if sys.platform.startswith('linux'):\n"
                "  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                "  if os.getppid() != int(sys.argv[1]): sys.exit('the starting process is gone')\n"
                "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _dies_with_this_process(args: Sequence[str]) -> list[str]:
  """``args`` wrapped so that the command dies with this process (Linux) and no stray SuperNode
  outlives a killed caller to hold ports or serve a later run."""
  return [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *args]


def _stop(processes: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to each process group, SIGKILL to what is left after 30 s."""
  for p in processes:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(p.pid, signal.SIGTERM)
  for p in processes:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def log_tails(root: Path, lines: int = 30) -> str:
  """The last ``lines`` lines of every log under ``<root>/logs``, each under its file name."""
  parts = []
  for log in sorted(Path(root, "logs").glob("*.log")):
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    parts.append(f"--- {log} (last {len(tail)} lines)\n" + "\n".join(tail))
  return "\n".join(parts)


def _wait_for_socket(path: Path, process: subprocess.Popen, root: Path, timeout: float = 120.0) -> None:
  """Returns once the site worker ``process`` serves ``path``.

  Raises:
    FederationError: the worker exited first or did not serve within ``timeout`` seconds.
  """
  deadline = time.monotonic() + timeout
  while not path.exists():
    if process.poll() is not None or time.monotonic() > deadline:
      raise FederationError(f"the site worker for {path} did not start.\n{log_tails(root)}")
    time.sleep(0.2)


def _wait_for_port(port: int, process: subprocess.Popen, root: Path, timeout: float = 60.0) -> None:
  """Returns once something accepts connections on 127.0.0.1:``port``.

  Raises:
    FederationError: ``process`` exited first, or nothing listened within ``timeout`` seconds.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise FederationError(f"flower-superlink exited with code {process.returncode} before listening on "
                            f"port {port}.\n{log_tails(root)}")
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise FederationError(f"flower-superlink did not listen on port {port} within {timeout:.0f} s.\n{log_tails(root)}")


@contextlib.contextmanager
def federation(root: Path, node_configs: Sequence[Mapping[str, Any]],
               site_workers: bool = False) -> Iterator[Federation]:
  """Starts a SuperLink and one SuperNode per node config, each on a free port; stops them all on exit.

  With ``site_workers``, each SuperNode also gets a site worker (:mod:`hetlora.flower.site_worker`,
  socket ``<root>/site<k>.sock`` set as its ``site-worker``), which keeps the experiment and the
  compiled local training between messages.

  Every process gets its own process group and, on Linux, dies with the process that started it, so
  none outlives a crashed caller (e.g. a killed test worker) to hold ports or connect to a later run.

  Raises:
    FederationError: the SuperLink did not start (the message holds the logs' tails).
  """
  root = Path(root)
  (root / "logs").mkdir(parents=True, exist_ok=True)
  (root / "flwr").mkdir(exist_ok=True)
  port = free_port()
  (root / "flwr" / "config.toml").write_text(tomli_w.dumps(
      {"superlink": {"default": "localhost", "localhost": {"address": f"127.0.0.1:{port}", "insecure": True}}}))
  env = {**os.environ, "FLWR_HOME": str(root / "flwr"),
         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

  def start(log: str, *args: str) -> subprocess.Popen:
    with open(root / "logs" / log, "w") as out:
      return subprocess.Popen(_dies_with_this_process(args), env=env, cwd=root, stdout=out,
                              stderr=subprocess.STDOUT, start_new_session=True)

  superlink = start("superlink.log", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                    "--port", str(port))
  nodes: list[subprocess.Popen] = []
  workers: list[subprocess.Popen] = []
  try:
    _wait_for_port(port, superlink, root)
    for k, config in enumerate(node_configs):
      if site_workers:
        socket_path = root / f"site{k}.sock"
        workers.append(start(f"siteworker{k}.log", sys.executable, "-m", "hetlora.flower.site_worker",
                             "--socket", str(socket_path)))
        _wait_for_socket(socket_path, workers[-1], root)
        config = {**config, "site-worker": str(socket_path)}
      nodes.append(start(f"supernode{k}.log", "flower-supernode", "--insecure", "--superlink",
                         f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config", _node_config(config)))
    yield Federation(root, env, superlink, nodes, workers)
  finally:
    _stop([*nodes, *workers, superlink])


def run_app(fed: Federation, run_config: Mapping[str, Any], timeout: float = 3600.0) -> None:
  """``flwr run launch/flower localhost`` with ``run_config`` (written as TOML); waits for the run to end.

  Raises:
    FederationError: the run failed or took longer than ``timeout`` seconds; the message holds the
      tails of ``flwr run``'s output and of every process's log (all under ``<root>/logs``).
  """
  path = fed.root / "run_config.toml"
  path.write_text(tomli_w.dumps(dict(run_config)))
  try:
    with open(fed.root / "logs" / "flwr_run.log", "w") as out:
      subprocess.run(["flwr", "run", str(APP), "localhost", "--stream", "--run-config", str(path)],
                     env=fed.env, cwd=fed.root, check=True, timeout=timeout, stdout=out, stderr=subprocess.STDOUT)
  except subprocess.CalledProcessError as e:
    raise FederationError(f"`flwr run` exited with code {e.returncode}.\n{log_tails(fed.root)}") from e
  except subprocess.TimeoutExpired as e:
    raise FederationError(f"`flwr run` did not finish within {timeout:.0f} s.\n{log_tails(fed.root)}") from e


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="folder for logs and Flower's state")
  parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (node k holds clients k, k + nodes, ...)")
  parser.add_argument("--clients", type=int, default=0, help="clients to spread (default: one per node)")
  parser.add_argument("--config", required=True, help="experiment config, path[:arg]")
  parser.add_argument("--overrides", default="", help="'server.rounds=3 ...' config fields")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--site-workers", action="store_true",
                      help="give each SuperNode a site worker that keeps the compiled training between messages")
  args = parser.parse_args(argv)
  root = Path(args.root).resolve()
  clients = args.clients or args.nodes
  nodes = [{"client-ids": ",".join(str(c) for c in range(k, clients, args.nodes)),
            "xla-cache": str(root / "xla")} for k in range(args.nodes)]
  t0 = time.perf_counter()
  with federation(root, nodes, site_workers=args.site_workers) as fed:
    run_app(fed, {"config": args.config, "overrides": args.overrides, "workdir": str(Path(args.workdir).resolve()),
                  "min-nodes": args.nodes})
  print(f"done in {time.perf_counter() - t0:.1f} s; metrics in {args.workdir}/metrics.jsonl, logs in {root}/logs")


if __name__ == "__main__":
  main()
