"""Federated instruction tuning of SmolLM2-135M-Instruct on your own JSONL instruction data.

Data (``data.source='instructions'``, :func:`hetlora.data.instructions`): ``train=`` a
JSONL file, one example a line, either ``{"instruction", "input" (optional), "output"}``
or ``{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}`` whose last,
assistant turn is the answer (earlier turns are the prompt, in the chat template); an
optional ``"client"`` field names the example's client. With it, ``partition=natural``
(the default) gives one federated client per distinct value (``clients=`` must be their
number; a wrong number is an error that names the right one); without it use
``partition=iid`` or ``partition=dirichlet`` with any ``clients=``. Each client's rows
are split 90/10 into training and test rows, or ``test=`` names a test file of its own.
A bad row is an error naming the file and the line. Whole clients can be held out as
unseen tasks: ``--config.data.unseen_tasks='("name",)'``.

Model, LoRA, methods and evaluation are those of ``configs/natinst_smollm2.py``: prompts
in the chat template, loss on the answer, greedy answers to 64 test prompts scored by
ROUGE-L (and exact match where answers come from a small label set, or after
``--config.eval.answer_marker='####'``), the base model evaluated as round 0.

Commands:
  python launch/train.py --config configs/instructions_smollm2.py:train=mine.jsonl,clients=12 --workdir wd/mine
  python launch/train.py --config configs/instructions_smollm2.py:train=a.jsonl,test=b.jsonl,partition=iid,clients=8 --workdir wd/iid
  # smoke run (2 rounds of 2 steps, 64 tokens, 4 answers per evaluation)
  python launch/train.py --config configs/instructions_smollm2.py:train=mine.jsonl,clients=4,runlocal --workdir /tmp/mine
Arguments: ``train=``, ``test=``, ``clients=``, ``partition=`` (``natural``, ``iid``,
``dirichlet``), ``method=`` (as in ``natinst_smollm2``), ``rounds=``, ``steps=``, ``runlocal``.
Runtime and scores depend on your data (not measured here).
"""

import common
import natinst_smollm2


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", train="", test="", clients=8, partition="natural",
                       rounds=10, steps=8, runlocal=False)
  c = natinst_smollm2.get_config(f"method={a.method}")
  c.data.source = "instructions"
  c.data.source_kwargs.max_per_task = None   # natinst's option: unset
  c.data.test_kwargs.max_per_task = None
  if a.train:
    c.data.source_kwargs.path = a.train
  if a.test:
    c.data.test_kwargs.update(path=a.test, split="all")
  c.data.unseen_tasks = ()
  c.data.partition = a.partition
  c.data.num_clients = a.clients
  c.data.min_client_size = 2
  c.server.clients_per_round = min(8, a.clients)
  c.server.rounds = a.rounds
  c.client.local_steps = a.steps
  if a.runlocal:
    c.server.clients_per_round = min(2, a.clients)
    c.server.rounds = 2
    common.llm_smoke(c)
  return c
