"""BANKING77 intent classification in the setting of LoRA-A² (Koo et al., ACL 2025, arXiv 2410.22815).

Setting: 30 clients, all taking part every round, Dirichlet label skew
(``alpha`` in {0.5, 0.1, 0.01}), client ranks drawn from {1, 2, 4, 8, 16, 32}
(``ranks=uniform|heavy_tail|normal``), AdamW 5e-4, 50 rounds of 5 local
epochs, LoRA on attention query/value. Deviations: MiniLM-L6 (22.7M) instead
of RoBERTa-base; by default the classifier is adapted by LoRA too
(``head=lora``; ``head=frozen`` keeps it a frozen random projection, as in the
paper; ``head=train`` trains it in every client and FedAvgs it, as HeLoRA
does and as PEFT's ``modules_to_save``; ``config.model.head``). Methods:
every name in ``hetlora.methods.names()``, plus
``homlora_min|homlora_max`` (HomLoRA with every client at rank 1 or 32).
HetLoRA runs with its tail regulariser and self-pruning (its defaults);
every other method trains on the task loss alone. Every method trains at
the same LoRA scale ``alpha / r_max = 2`` (FFA-LoRA, at rank 8, too: the
scale of LoRA-A2's FFA-LoRA rows, 16/8).

Commands:
  # full setting (GPU; about 15 s per round on one A100-class GPU, untested here)
  python launch/train.py --config configs/banking77.py:method=hetlora,alpha=0.1 --workdir wd/b77
  # the same with the classifier head trained by every client and averaged
  python launch/train.py --config configs/banking77.py:method=hetlora,alpha=0.1,head=train --workdir wd/b77t
  # the CPU budget used for the README table (2-core CPU, about 5 min per method)
  python launch/train.py --config configs/banking77.py:method=hetlora,alpha=0.1,cpu --workdir wd/b77cpu
  # the CPU budget where the methods learn (<= 15 min per method on 2 cores; 20 rounds of
  # 10 clients x 20 steps of 16 over all 10,003 examples, lr 5e-3), the paper's frozen head
  python launch/compare.py --config configs/banking77.py:cpu15,head=frozen --alphas 0.5,0.1 --out W
  # smoke test
  python launch/train.py --config configs/banking77.py:runlocal --workdir /tmp/b77
  # the paper's setting (frozen head) for the main methods, MiniLM or a local RoBERTa-base dir (GPU)
  launch/lora_a2.sh results/lora_a2 /path/to/roberta-base
Data: ../shared/data/banking77 (train.csv/test.csv); ``data_dir=...`` to override.
Measured results: docs/results.md (written by launch/compare.py and benchmarks/results_page.py).
"""

import common

RANK_CHOICES = (1, 2, 4, 8, 16, 32)


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", alpha=0.1, ranks="uniform", head="lora",
                       data_dir="", cpu=False, cpu15=False, runlocal=False)
  c = common.base()
  c.data.source = "banking77"
  if a.data_dir:
    c.data.source_kwargs.data_dir = a.data_dir
  c.data.num_clients = 30
  c.data.dirichlet_alpha = a.alpha
  c.data.min_client_size = 2
  c.server.clients_per_round = 30
  c.server.rounds = 50
  c.client.local_steps = 0
  c.client.local_epochs = 5.0
  c.client.learning_rate = 5e-4
  c.client.batch_size = 16
  c.lora.rank_choices = RANK_CHOICES
  c.lora.r_min, c.lora.r_max = 1, 32
  c.lora.rank_distribution = a.ranks
  c.lora.pattern = r"attention/(query|value)/kernel$"
  c.model.head = a.head
  c.eval.every = 5
  c.checkpoint_every = 5

  common.apply_method(c, a.method, RANK_CHOICES, public_examples=500)
  method = c.method.name

  if a.cpu or a.cpu15:  # CPU budgets: 500 test examples, 32 tokens, fixed local steps of 16
    c.data.max_test_examples = 500
    c.model.max_len = 32
    c.client.local_epochs = 0.0
    c.client.batch_size = 16
    c.eval.every = 2
    c.checkpoint_every = 2
    if method == "helora_kd":
      c.data.public_examples = 200
      c.method.kwargs = {"epochs": 1}
  if a.cpu:  # about 5 minutes per method on 2 cores (most methods stay near chance)
    c.data.max_train_examples = 3000
    c.server.rounds = 6
    c.client.local_steps = 4
    c.client.learning_rate = 1e-2
  if a.cpu15:  # <= 15 minutes per method on 2 cores, where methods learn (HomLoRA r=32, frozen head: ~0.75)
    c.data.max_train_examples = 0          # all 10,003 training examples
    c.server.rounds = 20
    c.server.clients_per_round = 10
    c.client.local_steps = 20
    c.client.learning_rate = 5e-3
  if a.runlocal:
    c.data.max_train_examples = 300
    c.data.max_test_examples = 64
    c.data.num_clients = 6
    c.server.clients_per_round = 3
    c.server.rounds = 2
    c.client.local_epochs = 0.0
    c.client.local_steps = 2
    c.model.max_len = 16
    c.eval.every = 1
    c.checkpoint_every = 1
    if c.data.public_examples:
      c.data.public_examples = 32
  return c
