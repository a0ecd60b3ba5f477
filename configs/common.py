"""Defaults shared by the experiment configs (every field documented once, here).

A config file builds on :func:`base` and overrides what its experiment
changes. ``parse_arg('method=hetlora,alpha=0.1,runlocal')`` reads the
big_vision-style variant string of ``get_config(arg)``.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """``'k=v,flag'`` -> ConfigDict of ``defaults`` updated (flags become True)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
    kind = type(out[key])
    out[key] = True if not _ else (value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
  return out


def base():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.checkpoint_every = 5      # rounds between orbax checkpoints (and one at the end)
  c.tensorboard = False       # also write tensorboardX scalars

  c.model = ml_collections.ConfigDict()
  c.model.kind = "bert_classifier"    # a module of hetlora.models: 'bert_classifier' | 'llama_lm'
  c.model.name = "all-minilm-l6-v2"   # a known name (installed package) or a local dir / GGUF file
  c.model.pooling = "mean"            # 'mean' | 'cls'
  c.model.max_len = 64                # tokens per example (truncate / pad)
  c.model.dtype = "float32"           # compute dtype: 'float32' | 'bfloat16'

  c.data = ml_collections.ConfigDict()
  c.data.source = "tweets"            # 'tweets' | 'banking77' | 'csv' | 'jsonl' | 'tfds'
  c.data.source_kwargs = ml_collections.ConfigDict()  # e.g. data_dir, path, text_column, label_column
  c.data.test_kwargs = ml_collections.ConfigDict()    # overrides for the test data, e.g. path of a test CSV
  c.data.partition = "dirichlet"      # 'dirichlet' | 'iid' | 'shards' | 'natural' (one client per task)
  c.data.num_clients = 20
  c.data.dirichlet_alpha = 0.5
  c.data.min_client_size = 10
  c.data.shards_per_client = 2
  c.data.max_train_examples = 0       # 0 = all; else a seeded subsample
  c.data.max_test_examples = 0
  c.data.public_examples = 0          # held-out training examples for server-side distillation (HeLoRA-KD)

  c.lora = ml_collections.ConfigDict()
  c.lora.pattern = ""                 # regex over parameter paths; "" = the model provider's default
  c.lora.r_min = 2
  c.lora.r_max = 16
  c.lora.rank_choices = ()            # e.g. (1, 2, 4, 8, 16, 32); empty = every rank in [r_min, r_max]
  c.lora.rank_distribution = "uniform"  # 'uniform' | 'heavy_tail' | 'normal' | 'constant'
  c.lora.alpha = 16.0
  c.lora.scale_rule = "alpha/r"       # 'alpha/r' (client rank) | 'alpha/r_max' | 'rslora'

  c.method = ml_collections.ConfigDict()
  c.method.name = "hetlora"           # a module of hetlora.methods: hetlora, zero_pad, homlora, ...
  c.method.kwargs = ml_collections.ConfigDict()  # that module's make() options, e.g. HetLoRA's
                                                 # lam (1e-3), gamma (0.99), prune (True)

  c.client = ml_collections.ConfigDict()
  c.client.optimizer = "adamw"
  c.client.learning_rate = 5e-4
  c.client.weight_decay = 0.0
  c.client.batch_size = 16
  c.client.local_epochs = 0.0         # set exactly one of local_epochs / local_steps
  c.client.local_steps = 10
  c.client.backend = "vmap"           # 'vmap' | 'sequential' | 'chunked' | 'sharded' (clients over devices)
  c.client.chunk_size = 0             # clients per chunk ('chunked'; optional for 'sharded')

  c.server = ml_collections.ConfigDict()
  c.server.rounds = 10
  c.server.clients_per_round = 5

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1
  c.eval.batch_size = 64
  return c
