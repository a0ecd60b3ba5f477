"""Multiple-choice evaluation by the answer options' log-likelihood under a decoder.

An example with prompt ``c`` and options ``o_1..o_K`` (a
:class:`hetlora.data.PromptDataset` with ``choices``) becomes ``K`` rows, one
sequence ``c' o_k'`` each (the provider's training format without the
end-of-sequence token). Each option is scored as a continuation, as the
EleutherAI LM Evaluation Harness (Gao et al., 2023) and the commonsense tables
of LLM-Adapters (Hu et al., EMNLP 2023, arXiv:2304.01933) score them::

    s_k = sum_{t in o_k} log p(x_t | x_<t)          'accuracy'       (the harness's acc)
    s_k / bytes(o_k)                                'accuracy_norm'  (acc_norm: per UTF-8 byte)

and the prediction is ``argmax_k`` (the first option on a tie). A task's
accuracy is the mean over its examples; ``accuracy`` and ``accuracy_norm`` are
the means over tasks (the tables' "Avg." column), ``accuracy/<task>`` and
``accuracy_norm/<task>`` the tasks' own.

Rows run through a jitted ``score_fn`` in batches of ``batch_size`` rows of
similar length (sorted by length, each batch cut to its longest row rounded
up to ``multiple`` tokens), so an evaluation compiles once per width, at most
``L / multiple`` times a run.

Example::

    rows = option_rows(test_ds, tokenize_fn)          # tokenize_fn: the provider's
    evaluate = make_evaluator(score_fn, {'test': rows}, batch_size=16)
    metrics, samples = evaluate(base, adapters)       # metrics['test']['accuracy']: [G]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hetlora.data.sources import PromptDataset

COLUMNS = ("input_ids", "attention_mask", "loss_mask")


@dataclasses.dataclass(frozen=True)
class OptionRows:
  """The ``R`` (example, option) rows of ``N`` multiple-choice examples, tokenized.

  Attributes:
    columns: ``input_ids, attention_mask, loss_mask: int32[R, L]`` (``loss_mask`` on the option's tokens).
    example: ``int64[R]`` the row's example.
    option: ``int64[R]`` the row's option within its example.
    option_bytes: ``int64[R]`` UTF-8 bytes of the option's text (``>= 1``).
    answers: ``int64[N]`` the correct option of each example.
    tasks: ``N`` task names.
    prompts: ``N`` prompt texts.
    choices: ``N`` lists of option texts.
  """
  columns: dict[str, np.ndarray]
  example: np.ndarray
  option: np.ndarray
  option_bytes: np.ndarray
  answers: np.ndarray
  tasks: list[str]
  prompts: list[str]
  choices: list[list[str]]


def option_rows(ds: PromptDataset, tokenize_fn: Callable[[PromptDataset], Mapping[str, np.ndarray]]
                ) -> OptionRows:
  """The rows of ``ds`` (which must have ``choices``), tokenized by ``tokenize_fn``.

  Args:
    ds: multiple-choice examples.
    tokenize_fn: ``PromptDataset -> {'input_ids', 'attention_mask', 'loss_mask': [R, L]}``, the
      loss mask on each target's tokens (a provider's training tokenization, without eos).
  """
  if ds.choices is None:
    raise ValueError("option_rows needs multiple-choice data (a PromptDataset with choices); this data "
                     "has open answers.")
  example = np.asarray([i for i, c in enumerate(ds.choices) for _ in c], np.int64)
  option = np.asarray([k for c in ds.choices for k in range(len(c))], np.int64)
  texts = [o for c in ds.choices for o in c]
  messages = None if ds.messages is None else [ds.messages[i] for i in example]
  pairs = PromptDataset([ds.prompts[i] for i in example], texts, ds.task_ids[example], list(ds.task_names),
                        messages)
  cols = tokenize_fn(pairs)
  return OptionRows(
      columns={k: np.asarray(cols[k]) for k in COLUMNS}, example=example, option=option,
      option_bytes=np.asarray([max(len(o.strip().encode("utf-8")), 1) for o in texts], np.int64),
      answers=np.asarray([c.index(t) for c, t in zip(ds.choices, ds.targets)], np.int64),
      tasks=[ds.task_names[i] for i in ds.task_ids], prompts=list(ds.prompts),
      choices=[list(c) for c in ds.choices])


def length_batches(lengths: np.ndarray, batch_size: int, multiple: int = 32) -> list[tuple[np.ndarray, int]]:
  """``[(rows int64[batch_size], width)]``: rows sorted by length, ``batch_size`` at a time.

  ``width`` is the batch's longest row rounded up to a multiple of ``multiple``; the last batch
  is filled up with copies of its first row (their scores are dropped by the caller).

  Example:
    >>> [(r.tolist(), w) for r, w in length_batches(np.asarray([40, 3, 33, 5]), 2, multiple=8)]
    [([1, 3], 8), ([2, 0], 40)]
  """
  order = np.argsort(np.asarray(lengths), kind="stable")
  out = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    out.append((rows, int(-(-int(np.max(lengths[rows])) // multiple) * multiple)))
  return out


def option_logprobs(score_fn: Callable[..., Any], base, lora, rows: OptionRows, batch_size: int,
                    multiple: int = 32) -> np.ndarray:
  """``float64[R]``: every row's option log-likelihood ``sum_t loss_mask_t log p(x_t | x_<t)``.

  Args:
    score_fn: ``(base, lora, {column: int32[B, W]}) -> float[B]`` (jitted).
    base, lora: the model's weights and one folded adapter (or None).
    rows: :func:`option_rows`.
    batch_size, multiple: as in :func:`length_batches`.
  """
  if batch_size < 1:
    raise ValueError(f"eval.batch_size={batch_size} must be >= 1 (option rows scored per call).")
  lengths = rows.columns["attention_mask"].sum(axis=1)
  out = np.zeros(len(lengths), np.float64)
  for idx, width in length_batches(lengths, batch_size, multiple):
    batch = {k: v[idx, :width] for k, v in rows.columns.items()}
    out[idx] = np.asarray(score_fn(base, lora, batch), np.float64)   # copies write their own row again
  return out


def predictions(scores: np.ndarray, rows: OptionRows) -> np.ndarray:
  """``int64[N]``: each example's highest-scoring option (the first one on a tie)."""
  table = np.full((len(rows.answers), int(rows.option.max(initial=0)) + 1), -np.inf)
  table[rows.example, rows.option] = scores
  return np.argmax(table, axis=1)


def task_accuracies(correct: np.ndarray, tasks: list[str], metric: str) -> dict[str, float]:
  """``{metric: mean over tasks, f'{metric}/{task}': the task's mean}`` of ``correct: bool[N]``."""
  names = list(dict.fromkeys(tasks))
  per_task = {name: float(np.mean([c for c, t in zip(correct, tasks) if t == name])) for name in names}
  return {metric: float(np.mean(list(per_task.values()))) if per_task else float("nan"),
          **{f"{metric}/{name}": v for name, v in per_task.items()}}


def score(scores: np.ndarray, rows: OptionRows) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """``(metrics, predicted int64[N], predicted_norm int64[N])`` of the rows' log-likelihoods."""
  predicted = predictions(scores, rows)
  predicted_norm = predictions(scores / rows.option_bytes, rows)
  metrics = {**task_accuracies(predicted == rows.answers, rows.tasks, "accuracy"),
             **task_accuracies(predicted_norm == rows.answers, rows.tasks, "accuracy_norm")}
  return metrics, predicted, predicted_norm


def make_evaluator(score_fn: Callable[..., Any], sets: Mapping[str, OptionRows], *, batch_size: int,
                   multiple: int = 32, samples_per_task: int = 2):
  """``evaluate(base, adapters) -> (metrics, samples)``: every adapter's choices on ``sets``, scored.

  Args:
    score_fn: as in :func:`option_logprobs`.
    sets: ``{name: OptionRows}``, e.g. ``{'test': ..., 'unseen': ...}``.
    batch_size, multiple: as in :func:`length_batches`.
    samples_per_task: the first this many examples of each task (of adapter 0) go to ``samples``.

  Returns:
    ``evaluate(base, adapters)`` where ``adapters`` has a leading axis of ``G`` models, returning
    ``metrics: {set: {metric: [G] floats}}`` (:func:`score`'s metrics) and
    ``samples: [{'set', 'task', 'prompt', 'choices', 'reference', 'prediction', 'correct'}]``.
  """
  def evaluate(base, adapters):
    groups = int(jax.tree.leaves(adapters)[0].shape[0]) if jax.tree.leaves(adapters) else 1
    metrics: dict[str, dict[str, list[float]]] = {}
    samples: list[dict[str, Any]] = []
    for name, rows in sets.items():
      per_group: dict[str, list[float]] = {}
      for g in range(groups):
        lora = jax.tree.map(lambda x: x[g], adapters)   # noqa: B023 -- used at once
        values, predicted, _ = score(option_logprobs(score_fn, base, lora, rows, batch_size, multiple), rows)
        for k, v in values.items():
          per_group.setdefault(k, []).append(v)
        if g == 0:
          samples += _samples(name, rows, predicted, samples_per_task)
      metrics[name] = per_group
    return metrics, samples

  return evaluate


def _samples(name: str, rows: OptionRows, predicted: np.ndarray, per_task: int) -> list[dict[str, Any]]:
  seen: dict[str, int] = {}
  out = []
  for i, task in enumerate(rows.tasks):
    seen[task] = seen.get(task, 0) + 1
    if seen[task] <= per_task:
      out.append({"set": name, "task": task, "prompt": rows.prompts[i], "choices": rows.choices[i],
                  "reference": rows.choices[i][rows.answers[i]],
                  "prediction": rows.choices[i][predicted[i]], "correct": bool(predicted[i] == rows.answers[i])})
  return out
