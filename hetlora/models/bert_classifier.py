"""Model provider ``bert_classifier``: a BERT-family encoder + pooled linear head.

The encoder (:class:`hetlora.models.bert.BertClassifier`) loads from a
Hugging Face directory (``config.json``, ``model.safetensors``,
``tokenizer.json``) or a known package model such as ``all-minilm-l6-v2``;
the head ``classifier/{kernel,bias}`` (``HEAD_PATTERN``) is initialised from
``key``; ``config.model.head`` decides whether clients adapt it by LoRA (the
default), keep it frozen or train it in full (:func:`hetlora.experiment.trainable_patterns`). The loss
is the per-example softmax cross-entropy ``l_i = -log softmax(f(x_i))[y_i]``.

``config.model``: ``name``, ``max_len`` (<= the checkpoint's positions),
``dtype``, ``pooling`` (``'mean'`` or ``'cls'``). See
:mod:`hetlora.models.provider` for the interface.

Example::

    loaded = bert_classifier.load(config.model, num_labels=3, key=jax.random.key(0))
    cols = loaded.prepare(tweets_ds)   # input_ids, attention_mask, token_type_ids: [N, L]; label: [N]
                                       # + truncated, empty: bool[N] (report flags, not batched)
"""

from __future__ import annotations

import functools

import jax

from hetlora.data.sources import TextDataset
from hetlora.data.tokenize import tokenize_dataset
from hetlora.models import bert, bert_loading, tasks, tokenizer as tokenizer_lib
from hetlora.models.provider import (Loaded, check_dataset, compute_dtype,
                                     max_len_of, model_errors, num_classes_of, pooling_of)

KIND = "bert_classifier"
TASK = "classification"
DEFAULT_NAME = "all-minilm-l6-v2"
DEFAULT_PATTERN = r"attention/(query|value)/kernel$"
# The head the checkpoint lacks (drawn from ``key``); config.model.head decides how it trains.
HEAD_PATTERN = r"^classifier/(kernel|bias)$"


def load(model_config, *, num_labels: int | None, key: jax.Array) -> Loaded:
  """Loads the encoder and tokenizer, adds a random ``num_labels``-way head from ``key``.

  Raises:
    ValueError / FileNotFoundError: naming the ``model.*`` field at fault.
  """
  num_labels = num_classes_of(num_labels, KIND)
  name = model_config.get("name") or DEFAULT_NAME
  dtype = compute_dtype(model_config)
  pooling = pooling_of(model_config, bert.POOLINGS)
  max_len_of(model_config)  # fail before loading; the position limit is checked after
  with model_errors(name, KIND):
    config, encoder = bert_loading.load_bert(name)
  default_len = max_len_of(model_config, limit=config.max_tokens)
  with model_errors(name, KIND):
    tok = tokenizer_lib.load_tokenizer(name, max_len=default_len)
  pad_id = tokenizer_lib.pad_id_of(tok)
  model = bert.BertClassifier(config, num_labels, pooling=pooling, dtype=dtype)
  base = {**encoder, **bert.init_head(key, config, num_labels)}
  logits_fn = tasks.classification_predict(model)

  def prepare(dataset, max_len: int | None = None):
    check_dataset(dataset, TextDataset, KIND, TASK)
    n = default_len if max_len is None else max_len_of(
        {"max_len": max_len}, limit=config.max_tokens)
    encode_fn = functools.partial(tokenizer_lib.encode, tok, max_len=n, pad_id=pad_id)
    return tokenize_dataset(dataset, encode_fn, n, pad_id=pad_id)

  return Loaded(base_params=base, loss_fn=tasks.classification_loss(model), logits_fn=logits_fn,
                eval_sums=tasks.classification_eval_sums(logits_fn), prepare=prepare, tokenizer=tok, model=model,
                config=config)

