"""Federated LoRA text classification of your own CSV or JSONL files.

Data: ``train=`` and ``test=`` files (``.csv``, ``.jsonl``, either ``.gz``),
one example per row with a text column (``text=``, default ``text``) and a
label column (``label=``, default ``label``); labels are any strings or
integers, mapped to classes by the training file (a test label the training
file lacks is an error). Other encodings than UTF-8:
``--config.data.source_kwargs.encoding=latin-1``. The training rows are split
over 10 clients (Dirichlet 0.5 label skew), 5 per round; client ranks uniform
over {2, 4, 8, 16}; MiniLM-L6 (``--config.model.name=`` any local BERT-family
HF directory), 128 tokens (examples cut at 128 are counted and reported).

Commands:
  python launch/train.py --config configs/classify.py:train=train.csv,test=test.csv --workdir wd/mine
  python launch/train.py --config configs/classify.py:train=train.jsonl,test=test.jsonl,text=sentence,label=y,method=zero_pad --workdir wd/mine_zp
  # budget: 50 rounds of 20 local steps; HomLoRA baselines at the smallest / largest rank
  python launch/train.py --config configs/classify.py:train=train.csv,test=test.csv,rounds=50,steps=20,method=homlora_max --workdir wd/mine_hom
  # smoke run (300 training rows, 4 clients, 2 rounds of 2 steps, 32 tokens)
  python launch/train.py --config configs/classify.py:train=train.csv,test=test.csv,runlocal --workdir /tmp/mine
Arguments: ``method=`` any name in ``hetlora.methods.names()`` or ``homlora_min`` / ``homlora_max``
(HomLoRA with every client at rank 2 / 16); ``rounds=``, ``steps=`` (local steps per round);
``clients=``; ``train=``, ``test=``, ``text=``, ``label=``; ``runlocal``. The same run without
arguments: ``--config configs/classify.py --config.data.source_kwargs.path=train.csv
--config.data.test_kwargs.path=test.csv``.
Runtime and accuracy depend on your data (not measured here): the default trains 10 rounds
of 10 steps of 16 examples for each of 5 clients per round, MiniLM at 128 tokens, so expect
minutes on a 2-core CPU. ``hetlora.data.statistics(exp)`` counts the examples cut at 128 tokens.
"""

import common

RANK_CHOICES = (2, 4, 8, 16)


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", train="", test="", text="text", label="label",
                       rounds=10, steps=10, clients=10, runlocal=False)
  c = common.base()
  c.data.source = "jsonl" if a.train.endswith((".jsonl", ".jsonl.gz")) else "csv"
  if a.train:
    c.data.source_kwargs.path = a.train
  if a.test:
    c.data.test_kwargs.path = a.test
  c.data.source_kwargs.text_column = a.text
  c.data.source_kwargs.label_column = a.label
  c.data.partition = "dirichlet"
  c.data.dirichlet_alpha = 0.5
  c.data.num_clients = a.clients
  c.data.min_client_size = 5
  c.server.clients_per_round = min(5, a.clients)
  c.server.rounds = a.rounds
  c.client.local_steps = a.steps
  c.client.local_epochs = 0.0
  c.client.batch_size = 16
  c.client.learning_rate = 1e-3
  c.model.max_len = 128
  c.lora.rank_choices = RANK_CHOICES
  c.lora.r_min, c.lora.r_max = RANK_CHOICES[0], RANK_CHOICES[-1]
  c.lora.pattern = r"attention/(query|value)/kernel$|classifier/kernel$"
  c.eval.every = 2
  c.checkpoint_every = 5

  common.apply_method(c, a.method, RANK_CHOICES, public_examples=200)

  if a.runlocal:
    c.data.max_train_examples = 300
    c.data.max_test_examples = 64
    c.data.num_clients = 4
    c.server.clients_per_round = 2
    c.server.rounds = 2
    c.client.local_steps = 2
    c.model.max_len = 32
    c.eval.every = 1
    c.checkpoint_every = 1
    if c.data.public_examples:
      c.data.public_examples = 32
  return c
