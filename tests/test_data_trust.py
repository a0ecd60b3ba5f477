"""No silent failures in the data path: source options as config fields, one label map for train
and test, truncation and empty examples counted, ``configs/classify.py`` and the README's
bring-your-own-data command run on a tiny CSV with a tiny random model."""

import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import banking77  # noqa: E402
import classify  # noqa: E402
import common  # noqa: E402
import natinst_smollm2  # noqa: E402
import tweets_hetlora  # noqa: E402

from hetlora import data, experiment  # noqa: E402
from hetlora.models import provider  # noqa: E402

LABELS = ("pos", "neg", "neu")
WORDS = {"pos": "good great nice", "neg": "bad awful poor", "neu": "ok fine meh"}
KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def source_parameters() -> set[str]:
  return {n for fn in data.SOURCES.values() for n, p in inspect.signature(fn).parameters.items()
          if p.kind in KEYWORD}


def write_csv(path: Path, labels, header="text,label") -> Path:
  rng = np.random.default_rng(len(labels))
  rows = [header] + [f"{' '.join(rng.choice(WORDS[y].split(), 4))},{y}" for y in labels]
  path.write_text("\n".join(rows) + "\n")
  return path


def csv_config(train: Path, test: Path, **source_kwargs) -> ml_collections.ConfigDict:
  c = common.base()
  c.data.source = "csv"
  c.data.source_kwargs.path = str(train)
  c.data.source_kwargs.update(source_kwargs)
  c.data.test_kwargs.path = str(test)
  return c


# ----------------------------------------------------------------------------- config fields


def test_every_source_option_is_a_declared_config_field():
  params = source_parameters()
  assert set(common.SOURCE_OPTIONS) == params, "configs/common.SOURCE_OPTIONS must list every source option"
  c = common.base()
  for section in (c.data.source_kwargs, c.data.test_kwargs):
    assert set(section) == params and all(v is None for v in section.values())


def test_options_are_set_field_by_field_and_typos_are_refused():
  c = common.base()
  c.lock()   # as launch/train.py loads it
  c.data.source_kwargs.path = "train.csv"
  c.data.test_kwargs.encoding = "latin-1"
  c.data.source_kwargs.tasks = ["a", "b"]
  assert c.data.source_kwargs.tasks == ("a", "b")
  with pytest.raises(AttributeError, match='Did you mean "path"'):
    c.data.source_kwargs.pth = "train.csv"


def test_configs_keep_every_declared_source_option():
  params = source_parameters()
  tasks = natinst_smollm2.get_config("runlocal").data.source_kwargs.tasks
  cases = [
      (banking77.get_config("data_dir=/data/b77"), {"data_dir": "/data/b77"}, {}),
      (banking77.get_config(), {}, {}),
      (tweets_hetlora.get_config("runlocal"), {}, {}),
      (natinst_smollm2.get_config(), {"max_per_task": 64}, {"max_per_task": 8}),
      (natinst_smollm2.get_config("runlocal,data_dir=/n"), {"max_per_task": 8, "tasks": tasks, "data_dir": "/n"},
       {"max_per_task": 2}),
      (classify.get_config("train=a.csv,test=b.csv,text=s"), {"path": "a.csv", "text_column": "s",
                                                              "label_column": "label"}, {"path": "b.csv"}),
  ]
  for c, train, test in cases:
    assert set(c.data.source_kwargs) == params and set(c.data.test_kwargs) == params
    assert experiment.source_options(c, "source_kwargs") == train
    assert experiment.source_options(c, "test_kwargs") == test
  assert len(tasks) == 5   # 4 clients and 1 unseen task


def test_load_sources_passes_only_set_options(tmp_path):
  train = tmp_path / "train.csv"
  train.write_text("sentence,y\nhi,a\nbye,b\n")
  c = csv_config(train, train, text_column="sentence", label_column="y")
  train_ds, test_ds, _ = experiment.load_sources(c)
  assert train_ds.texts == ["hi", "bye"] and test_ds.label_names == ["a", "b"]
  c.data.source_kwargs = {"path": str(train), "text_column": "sentence", "label_column": "y"}  # a plain dict
  c.data.test_kwargs = {"path": str(train)}
  assert experiment.load_sources(c)[0].texts == ["hi", "bye"]


def test_source_option_errors_name_the_field(tmp_path):
  c = common.base()   # tweets
  c.data.source_kwargs.text_column = "body"
  with pytest.raises(ValueError, match=r"data\.source_kwargs sets \['text_column'\], which "
                     r"data\.source='tweets' does not take; unset them"):
    experiment.load_sources(c)
  c = csv_config(write_csv(tmp_path / "t.csv", LABELS), tmp_path / "t.csv")
  c.data.test_kwargs.path = None
  with pytest.raises(ValueError, match=r"data\.source='csv' has no splits: set data\.test_kwargs\.path"):
    experiment.load_sources(c)


# ----------------------------------------------------------------------------- one label map


def test_test_labels_follow_the_training_label_map(tmp_path):
  """A label only the training file has ('neg') used to shift every test label by one."""
  train = write_csv(tmp_path / "train.csv", ["neg", "neu", "pos"] * 4)
  test = write_csv(tmp_path / "test.csv", ["neu", "pos", "pos"])
  train_ds, test_ds, _ = experiment.load_sources(csv_config(train, test))
  assert train_ds.label_names == test_ds.label_names == ["neg", "neu", "pos"]
  np.testing.assert_array_equal(test_ds.labels, [1, 2, 2])


def test_unseen_test_label_names_the_label_and_the_test_file(tmp_path):
  train = write_csv(tmp_path / "train.csv", ["neg", "pos"] * 3)
  test = write_csv(tmp_path / "test.csv", ["neu", "pos", "neu"])
  with pytest.raises(ValueError, match=r"test file '.*test\.csv' \(data\.test_kwargs\.path\): test label\(s\) "
                     r"'neu' \(2 rows\) never occur in the training data"):
    experiment.load_sources(csv_config(train, test))


# ----------------------------------------------------------------------------- truncation and statistics


def columns(n, truncated, empty, labels, key="label"):
  return {"input_ids": np.ones((n, 4), np.int32), key: np.asarray(labels, np.int32),
          "truncated": np.asarray(truncated, bool), "empty": np.asarray(empty, bool)}


def test_data_statistics_counts_per_split_and_client():
  train = columns(6, [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 1, 2, 2, 2])
  test = columns(3, [0, 0, 1], [0, 0, 0], [1, 1, 2])
  parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
  stats = data.data_statistics(train, test, parts, label_names=["a", "b", "c"])
  assert stats["label_key"] == "label"
  assert stats["train"] == {"examples": 6, "truncated": 3, "empty": 1, "label_counts": {"a": 2, "b": 1, "c": 3}}
  assert stats["test"] == {"examples": 3, "truncated": 1, "empty": 0, "label_counts": {"a": 0, "b": 2, "c": 1}}
  assert stats["clients"] == [
      {"client": 0, "examples": 3, "truncated": 2, "empty": 0, "labels": 2, "top_label": "a",
       "top_label_share": 2 / 3},
      {"client": 1, "examples": 3, "truncated": 1, "empty": 1, "labels": 1, "top_label": "c",
       "top_label_share": 1.0}]
  json.dumps(stats)   # JSON-ready
  text = data.format_statistics(stats)
  assert "train: 6 examples, truncated 3 (50.0%), empty 1 (16.7%); labels a 2, b 1, c 3" in text
  assert "client    1:      3 examples, truncated 1 (33.3%), empty 1 (33.3%), 1 labels, top c (100%)" in text
  lm = data.data_statistics(columns(2, [1, 1], [0, 0], [0, 1], "task_id"), columns(1, [0], [0], [1], "task_id"),
                            [np.array([0, 1])])
  assert lm["label_key"] == "task_id" and lm["train"]["truncated"] == 2
  assert lm["train"]["label_counts"] == {"0": 1, "1": 1}


def test_packing_leaves_the_example_flags_out_of_batches():
  cols = columns(6, [1, 0, 1, 1, 0, 0], [0] * 6, [0, 1, 0, 1, 0, 1])
  packed = data.pack_cohort(cols, [np.arange(3), np.arange(3, 6)], 2, local_steps=1)
  assert set(packed) == {"input_ids", "label", "mask", "num_examples"}
  assert all(set(b) == {"input_ids", "label", "mask"} for b in data.batches(cols, 4))


def test_bert_provider_flags_examples_its_tokenizer_cut(tiny_model_dirs):
  cfg = ml_collections.ConfigDict({"name": tiny_model_dirs["bert_classifier"], "max_len": 8,
                                   "dtype": "float32", "pooling": "mean"})
  loaded = provider.get("bert_classifier").load(cfg, num_labels=2, key=jax.random.key(0))
  cols = loaded.prepare(data.TextDataset(["a rather long text", "hi", ""], [0, 1, 0], ["a", "b"]))
  np.testing.assert_array_equal(cols["truncated"], [True, False, False])
  np.testing.assert_array_equal(cols["empty"], [False, False, True])


def test_llama_provider_keeps_the_chat_template_head_and_the_answer(tiny_model_dirs):
  cfg = ml_collections.ConfigDict({"name": tiny_model_dirs["llama_lm"], "max_len": 220, "dtype": "float32"})
  loaded = provider.get("llama_lm").load(cfg, num_labels=None, key=None)
  # Character tokens: the template head is 42 tokens, 25% of the prompt room (54) keeps it.
  question = "Add one to the number at the very end of this long question. " * 3 + "Input: 2\nOutput:"
  cols = loaded.prepare(data.PromptDataset([question], [" 3"], [0], ["add"]))
  ids = cols["input_ids"][0][cols["attention_mask"][0] > 0].tolist()
  text = loaded.tokenizer.decode(ids, skip_special_tokens=False)
  assert text.startswith("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nAdd one")
  assert text.endswith("Input: 2\nOutput:<|im_end|>\n<|im_start|>assistant\n3<|im_end|>")
  assert bool(cols["truncated"][0]) and len(ids) == 220
  cfg.prompt_head = 0.0    # model.prompt_head: keep nothing of the prompt's start
  tail_only = provider.get("llama_lm").load(cfg, num_labels=None, key=None).prepare(
      data.PromptDataset([question], [" 3"], [0], ["add"]))
  assert not loaded.tokenizer.decode(tail_only["input_ids"][0][:50].tolist()).startswith("system")
  cfg.prompt_head = 2.0
  with pytest.raises(ValueError, match=r"model\.prompt_head=2\.0 must be a number in \[0, 1\]"):
    provider.get("llama_lm").load(cfg, num_labels=None, key=None)


# ----------------------------------------------------------------------------- configs/classify.py, README


def tiny_data(tmp_path):
  train = write_csv(tmp_path / "train.csv", list(LABELS) * 20)
  test = write_csv(tmp_path / "test.csv", list(LABELS) * 4)
  return train, test


def test_classify_config_runs_one_round(tmp_path, tiny_model_dirs):
  from hetlora import trainer
  train, test = tiny_data(tmp_path)
  c = classify.get_config(f"train={train},test={test},rounds=1,steps=1,clients=2")
  assert c.data.source == "csv" and c.lora.rank_choices == (2, 4, 8, 16)
  c.model.name = tiny_model_dirs["bert_classifier"]
  c.model.max_len = 8    # the tiny model's 4-word texts need more: every example is cut
  c.eval.batch_size = 16
  exp = experiment.build(c)
  stats = data.statistics(exp)
  assert stats["train"]["examples"] == 60 and stats["train"]["truncated"] == 60
  assert stats["test"]["label_counts"] == {"neg": 4, "neu": 4, "pos": 4}
  assert sum(client["examples"] for client in stats["clients"]) == 60 and len(stats["clients"]) == 2
  summary = trainer.run(c, str(tmp_path / "w"))
  assert summary["rounds"] == 1 and 0.0 <= summary["final_test_accuracy"] <= 1.0


def test_classify_config_arguments():
  jsonl = classify.get_config("train=a.jsonl.gz,test=b.jsonl.gz,label=y,method=homlora_max")
  assert jsonl.data.source == "jsonl" and jsonl.data.source_kwargs.label_column == "y"
  assert jsonl.method.name == "homlora" and tuple(jsonl.lora.rank_choices) == (16,)
  low = classify.get_config("method=homlora_min")
  assert tuple(low.lora.rank_choices) == (2,) and low.lora.r_min == 2
  local = classify.get_config("runlocal,method=helora_kd")
  assert local.server.rounds == 2 and local.data.public_examples == 32
  for method in ("hetlora", "zero_pad", "flexlora", "ffa_lora"):
    experiment.validate(classify.get_config(f"method={method}"))


def readme_command() -> list[str]:
  """The README's bring-your-own-data command, as argv."""
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  found = [b for b in blocks if "--config.data.source=csv" in b]
  assert len(found) == 1, "README: one bash block with the bring-your-own-data command"
  return shlex.split(found[0].replace("\\\n", " "))


def test_readme_bring_your_own_data_command_runs(tmp_path, tiny_model_dirs):
  argv = readme_command()
  assert argv[:2] == [".venv/bin/python", "launch/train.py"]
  assert "--config.data.source_kwargs.path=train.csv" in argv and "--config.data.test_kwargs.path=test.csv" in argv
  train, test = tiny_data(tmp_path)
  argv = [sys.executable, str(ROOT / "launch" / "train.py")] + [
      a.replace("=train.csv", f"={train}").replace("=test.csv", f"={test}") for a in argv[2:]]
  argv[argv.index("--workdir") + 1] = str(tmp_path / "w")
  # the sizes of test_classify_config_runs_one_round: its compiled programs come from the run-wide cache
  tiny = [f"--config.model.name={tiny_model_dirs['bert_classifier']}", "--config.model.max_len=8",
          "--config.server.rounds=1", "--config.client.local_steps=1", "--config.data.num_clients=2",
          "--config.server.clients_per_round=2", "--config.eval.batch_size=16"]
  out = subprocess.run(argv + tiny, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final test accuracy" in out.stdout
