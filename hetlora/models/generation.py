"""Generated answers as text, and their scores: ROUGE-L and exact match.

Model-agnostic host-side helpers of generation-based evaluation (the decoder
itself is :func:`hetlora.models.llama.generate`):

- :func:`decode_generated`: generated ids ``int[B, N]`` -> ``B`` strings, cut
  at the first end-of-sequence id, padding dropped;
- :func:`rouge_l`: the mean ROUGE-L F-measure (Lin, "ROUGE: A Package for
  Automatic Evaluation of Summaries", ACL Workshop 2004) with Google's
  ``rouge-score`` package, as Super-NaturalInstructions (Wang et al., EMNLP
  2022, arXiv:2204.07705) and FlexLoRA (Bai et al., NeurIPS 2024) report it:
  ``F = 2 P R / (P + R)`` with ``P = LCS / |prediction|`` and ``R = LCS / |reference|``
  over lower-cased alphanumeric tokens (Porter-stemmed by default);
- :func:`exact_match`: normalised string equality (lower case, no
  punctuation, no articles ``a/an/the``, single spaces, as SQuAD's and
  Super-NaturalInstructions' ``normalize_answer``), optionally of the text
  after the last answer ``marker`` (e.g. GSM8K's ``'####'``);
- :func:`classification_tasks`: the tasks whose answers come from a small
  label set (exact match is meaningful there);
- :func:`stratified`: a per-task round-robin subsample for a capped budget;
- :func:`score`: the metrics and per-example scores of one evaluation set;
- :func:`make_evaluator`: batched greedy answers of every adapter of a
  server to fixed-shape prompt sets, scored (the loop a model provider's
  ``generation_eval`` hook runs around its jitted decoder).

Example::

    texts = decode_generated(tok, out['tokens'], eos_ids=[eos], pad_id=pad)
    rouge_l(texts, references), exact_match('The Answer.', 'answer')   # (..., True)
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = frozenset(string.punctuation)
MAX_LABELS = 16   # a task with at most this many distinct answers (and repeats) is classification-like


def decode_generated(tokenizer, ids, eos_ids: Iterable[int] | int | None = None,
                     pad_id: int | None = None) -> list[str]:
  """Texts of generated ids: each row up to its first end-of-sequence id, padding dropped.

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (anything with ``decode(ids, skip_special_tokens=)``).
    ids: ``int[B, N]`` generated tokens (e.g. :func:`hetlora.models.llama.generate`'s ``'tokens'``).
    eos_ids: the ids that end an answer (one id or several, e.g. ``<|im_end|>`` and
      ``<|endoftext|>``); the first one in a row and everything after it are dropped.
    pad_id: an id to drop wherever it occurs (None: keep every id).

  Returns:
    ``B`` strings, special tokens skipped, surrounding whitespace stripped.

  Example::

    decode_generated(tok, [[72, 105, 2, 2]], eos_ids=2)   # ['Hi']
  """
  eos = {int(eos_ids)} if isinstance(eos_ids, (int, np.integer)) else {int(i) for i in eos_ids or ()}
  texts = []
  for row in np.asarray(ids).reshape(len(ids), -1).tolist():
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    kept = [t for t in row[:cut] if pad_id is None or t != pad_id]
    texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
  return texts


def normalize_answer(text: str) -> str:
  """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's normalisation)."""
  text = "".join(ch for ch in str(text).lower() if ch not in PUNCTUATION)
  return " ".join(ARTICLES.sub(" ", text).split())


def after_marker(text: str, marker: str | None) -> str:
  """The text after the last ``marker`` (all of ``text`` when the marker is absent or None)."""
  if not marker or marker not in text:
    return text
  return text.rsplit(marker, 1)[1]


def exact_match(prediction: str, reference: str, marker: str | None = None) -> bool:
  """Normalised equality of ``prediction`` and ``reference`` (of their text after ``marker``).

  Example::

    exact_match('The answer is 42.', 'answer is 42')          # True
    exact_match('so 6 + 7 = 13 #### 13', '#### 13', '####')   # True
  """
  return normalize_answer(after_marker(prediction, marker)) == normalize_answer(after_marker(reference, marker))


@functools.lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
  try:
    from rouge_score import rouge_scorer
  except ImportError as e:   # a dependency of the package; a missing one names its install
    raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from e
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str],
                   use_stemmer: bool = True) -> np.ndarray:
  """``float64[N]``: the ROUGE-L F-measure of each prediction against its reference."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references; pass one each.")
  scorer = _scorer(bool(use_stemmer))
  return np.asarray([scorer.score(str(r), str(p))["rougeL"].fmeasure
                     for p, r in zip(predictions, references)], np.float64)


def rouge_l(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> float:
  """The mean ROUGE-L F-measure over examples (NaN for none).

  Example::

    rouge_l(['the cat sat'], ['the cat'])   # 0.8: LCS 2, P = 2/3, R = 1
  """
  scores = rouge_l_scores(predictions, references, use_stemmer)
  return float(scores.mean()) if scores.size else float("nan")


def classification_tasks(targets: Sequence[str], task_names_of: Sequence[str],
                         max_labels: int = MAX_LABELS) -> set[str]:
  """Tasks whose answers come from a small label set.

  A task is classification-like when its examples have at most ``max_labels``
  distinct normalised answers and at most half as many as examples (so a
  generation task seen through a handful of examples is not one).

  Args:
    targets: ``N`` answers.
    task_names_of: ``N`` task names, one per answer.
    max_labels: the largest label set.
  """
  answers: dict[str, list[str]] = {}
  for t, name in zip(targets, task_names_of):
    answers.setdefault(name, []).append(normalize_answer(t))
  return {name for name, a in answers.items() if len(set(a)) <= max_labels and 2 * len(set(a)) <= len(a)}


def stratified(task_ids: np.ndarray, limit: int | None) -> np.ndarray:
  """``int64[M]`` sorted indices: the tasks' examples taken in turn (first of each task, then the
  second, ...) until ``limit`` (all when ``limit`` is None or 0 or covers them)."""
  task_ids = np.asarray(task_ids).reshape(-1)
  if not limit or limit >= len(task_ids):
    return np.arange(len(task_ids))
  rank = np.zeros(len(task_ids), np.int64)   # the example's place within its task
  for t in np.unique(task_ids):
    where = np.flatnonzero(task_ids == t)
    rank[where] = np.arange(len(where))
  order = np.lexsort((np.arange(len(task_ids)), rank))
  return np.sort(order[:limit])


def score(predictions: Sequence[str], references: Sequence[str], task_names_of: Sequence[str],
          classification: Iterable[str] = (), marker: str | None = None,
          use_stemmer: bool = True) -> tuple[dict[str, float], list[dict[str, float]]]:
  """Metrics of one evaluation set and the scores of each example.

  ``rougeL`` is the mean over examples; ``exact_match`` is the mean over the
  examples of the ``classification`` tasks, or over every example when an
  answer ``marker`` is given (absent when neither applies).

  Returns:
    ``({'rougeL': float, 'exact_match': float (when defined)},
    [{'rougeL': float, 'exact_match': bool}] per example)``.
  """
  rouge = rouge_l_scores(predictions, references, use_stemmer)
  exact = np.asarray([exact_match(p, r, marker) for p, r in zip(predictions, references)], bool)
  classes = set(classification)
  counted = np.asarray([bool(marker) or name in classes for name in task_names_of], bool)
  metrics = {"rougeL": float(rouge.mean()) if rouge.size else float("nan")}
  if counted.any():
    metrics["exact_match"] = float(exact[counted].mean())
  return metrics, [{"rougeL": float(r), "exact_match": bool(e)} for r, e in zip(rouge, exact)]


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """Prompts to answer, tokenized to one fixed shape, with their references.

  Attributes:
    input_ids: ``int32[n, P]`` right-padded prompts (``P`` shared by every set of a run).
    attention_mask: ``int32[n, P]``, 1 on prompt tokens.
    prompts: ``n`` prompt texts (as the data wrote them, for the samples file).
    references: ``n`` reference answers.
    tasks: ``n`` task names.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  prompts: list[str]
  references: list[str]
  tasks: list[str]


def answer(generate_fn: Callable[..., Any], decode_fn: Callable[[np.ndarray], list[str]], base, lora,
           prompts: PromptSet, batch_size: int) -> list[str]:
  """The decoded answers to every prompt, ``batch_size`` prompts per call of ``generate_fn``.

  The last batch is filled up with copies of its first prompt, so every call
  has the shape ``[batch_size, P]`` (one compilation) and the copies stop
  with it; their answers are dropped.
  """
  n = len(prompts.prompts)
  texts: list[str] = []
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    rows = np.where(rows < n, rows, start)
    tokens = generate_fn(base, lora, prompts.input_ids[rows], prompts.attention_mask[rows])
    texts += decode_fn(np.asarray(tokens))[:min(batch_size, n - start)]
  return texts


def make_evaluator(generate_fn: Callable[..., Any], decode_fn: Callable[[np.ndarray], list[str]],
                   sets: Mapping[str, PromptSet], *, batch_size: int, classification: Iterable[str] = (),
                   marker: str | None = None, samples_per_task: int = 2):
  """``evaluate(base, adapters) -> (metrics, samples)``: every adapter's answers to ``sets``, scored.

  Args:
    generate_fn: ``(base, lora, input_ids int32[B, P], attention_mask) -> int[B, N]`` generated
      ids (jitted: the same shapes every call).
    decode_fn: ``int[B, N] -> B`` answer strings (:func:`decode_generated`).
    sets: ``{name: PromptSet}``, e.g. ``{'test': ..., 'unseen': ...}``.
    batch_size: prompts per ``generate_fn`` call.
    classification, marker: as in :func:`score`.
    samples_per_task: the first this many examples of each task (of adapter 0) go to ``samples``.

  Returns:
    ``evaluate(base, adapters)`` where ``adapters`` has a leading axis of ``G`` models
    (``Method.global_adapters``), returning ``metrics: {set: {metric: [G] floats}}`` and
    ``samples: [{'set', 'task', 'prompt', 'reference', 'generation', 'rougeL', 'exact_match'}]``.
  """
  if batch_size < 1:
    raise ValueError(f"eval.batch_size={batch_size} must be >= 1 (prompts answered per decoder call).")
  classes = set(classification)

  def evaluate(base, adapters):
    groups = int(jax.tree.leaves(adapters)[0].shape[0]) if jax.tree.leaves(adapters) else 1
    metrics: dict[str, dict[str, list[float]]] = {}
    samples: list[dict[str, Any]] = []
    for name, prompts in sets.items():
      per_group: dict[str, list[float]] = {}
      for g in range(groups):
        lora = jax.tree.map(lambda x: x[g], adapters)   # noqa: B023 -- used at once
        texts = answer(generate_fn, decode_fn, base, lora, prompts, batch_size)
        values, per_example = score(texts, prompts.references, prompts.tasks, classes, marker)
        for k, v in values.items():
          per_group.setdefault(k, []).append(v)
        if g == 0:
          samples += _samples(name, prompts, texts, per_example, samples_per_task)
      metrics[name] = per_group
    return metrics, samples

  return evaluate


def _samples(name: str, prompts: PromptSet, texts: list[str], per_example: list[dict[str, Any]],
             per_task: int) -> list[dict[str, Any]]:
  seen: dict[str, int] = {}
  rows = []
  for i, task in enumerate(prompts.tasks):
    seen[task] = seen.get(task, 0) + 1
    if seen[task] <= per_task:
      rows.append({"set": name, "task": task, "prompt": prompts.prompts[i],
                   "reference": prompts.references[i], "generation": texts[i], **per_example[i]})
  return rows
