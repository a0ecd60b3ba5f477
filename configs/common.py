"""Defaults shared by the experiment configs (every field documented once, here).

A config file builds on :func:`base` and overrides what its experiment
changes. ``parse_arg('method=hetlora,alpha=0.1,runlocal')`` reads the
big_vision-style variant string of ``get_config(arg)``.
"""

import ml_collections
from ml_collections.config_dict import placeholder

# Every option of every data source (the keyword parameters of hetlora.data.SOURCES), declared in
# data.source_kwargs and data.test_kwargs with the value None = "not set" (the source's default), so
# --config.data.source_kwargs.path=train.csv works and a misspelt option is refused.
# tests/test_data_trust.py checks this table against the sources.
SOURCE_OPTIONS = {
    "path": str,            # csv / jsonl / tweets / instructions: the data file (.csv, .jsonl; .gz is read directly)
    "text_column": str,     # csv / jsonl: the text column (default "text")
    "label_column": str,    # csv / jsonl: the label column (default "label")
    "label_names": tuple,   # csv / jsonl: class names in id order (default: the sorted training labels)
    "encoding": str,        # csv / jsonl / instructions: the file's encoding (default "utf-8"; e.g. "latin-1")
    "data_dir": str,        # banking77 / tfds / natinst: the data directory
    "split": str,           # banking77 / tweets / tfds / natinst / instructions (default "train"; test data "test")
    "test_fraction": float,  # tweets / natinst / instructions: the share held out as the test split (per task)
    "seed": int,            # tweets / natinst / instructions: the seed of that split
    "name": str,            # tfds: the dataset name, e.g. "imdb_reviews"
    "text_key": str,        # tfds: the text feature (default "text")
    "label_key": str,       # tfds: the label feature (default "label")
    "tasks": tuple,         # natinst: task names (file stems); default all
    "max_per_task": int,    # natinst: at most this many examples per task
    "client_key": str,      # instructions: the JSONL field naming an example's client (default "client")
}


def source_options(**values):
  """A ConfigDict of every :data:`SOURCE_OPTIONS` field (``None`` = not set), ``values`` set."""
  out = ml_collections.ConfigDict({k: placeholder(t) for k, t in SOURCE_OPTIONS.items()})
  out.update(values)
  return out


def apply_method(c, method: str, rank_choices, public_examples: int, ffa_rank: int = 8):
  """Sets ``c.method.name`` (and what the method needs) from a config's ``method=`` argument.

  ``homlora_min`` / ``homlora_max`` are HomLoRA with every client at the smallest / largest of
  ``rank_choices``; FFA-LoRA runs every client at ``ffa_rank``; HeLoRA-KD distils on
  ``public_examples`` held-out examples. Every method then trains at one LoRA scale,
  ``alpha / r_max = 2``: a truncated global adapter means the same thing at every rank (with
  ``alpha / r_k`` a rank-1 client's slot would weigh 32x a rank-32 one's).
  """
  if method in ("homlora_min", "homlora_max"):
    rank = rank_choices[0] if method == "homlora_min" else rank_choices[-1]
    c.lora.rank_choices = (rank,)
    c.lora.r_min = rank
    method = "homlora"
  if method == "ffa_lora":
    c.lora.rank_choices, c.lora.r_min, c.lora.r_max = (ffa_rank,), ffa_rank, ffa_rank
  if method == "helora_kd":
    c.data.public_examples = public_examples
  c.method.name = method
  c.lora.scale_rule = "alpha/r_max"
  c.lora.alpha = 2.0 * c.lora.r_max


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
  c.model.head = placeholder(str)     # classifiers' random head: 'lora' (LoRA factors on its kernel; the
                                      # default when unset) | 'frozen' (kept as drawn: LoRA-A2, FFA-LoRA) |
                                      # 'train' (every client trains it, FedAvg'd; PEFT's modules_to_save)
  c.model.loss_chunk = placeholder(int)  # llama_lm: tokens per LM-head chunk in loss/eval (unset = 128; 0 = full logits)

  c.data = ml_collections.ConfigDict()
  c.data.source = "tweets"            # 'tweets' | 'banking77' | 'csv' | 'jsonl' | 'tfds' | 'natinst' | 'instructions'
                                      # | 'commonsense'
  c.data.source_kwargs = source_options()  # the source's options (SOURCE_OPTIONS above; None = not set)
  c.data.test_kwargs = source_options()    # options that differ for the test data, e.g. path of a test CSV
                                           # (set ones override source_kwargs); update these fields,
                                           # e.g. c.data.source_kwargs.update(path=...), don't assign a dict
  c.data.partition = "dirichlet"      # 'dirichlet' | 'iid' | 'shards' | 'natural' (one client per task)
  c.data.num_clients = 20
  c.data.dirichlet_alpha = 0.5
  c.data.min_client_size = 10
  c.data.shards_per_client = 2
  c.data.max_train_examples = 0       # 0 = all; else a seeded subsample
  c.data.max_test_examples = 0
  c.data.public_examples = 0          # held-out training examples for server-side distillation (HeLoRA-KD)
  c.data.unseen_tasks = ()            # instruction data: tasks held out of every client, evaluated as
                                      # unseen tasks (their test instances; metrics *_unseen)
  c.data.packing = True               # training batches: several examples per token row (segment ids;
                                      # same examples, losses and gradients per step; hetlora.data.segments)
  c.data.pack_rows = 0                # token rows per packed batch; 0 = the most any step of the run needs
  c.data.row_stream = False           # packed rows train one at a time, gradients summed over a step's
                                      # rows (same updates, no empty rows; hetlora.data.row_stream)

  c.lora = ml_collections.ConfigDict()
  c.lora.pattern = ""                 # regex over parameter paths; "" = the model provider's default
                                      # (a classifier's head follows model.head)
  c.lora.r_min = 2
  c.lora.r_max = 16
  c.lora.rank_choices = ()            # e.g. (1, 2, 4, 8, 16, 32); empty = every rank in [r_min, r_max]
  c.lora.rank_distribution = "uniform"  # 'uniform' | 'heavy_tail' | 'normal' | 'constant'
  c.lora.alpha = 16.0
  c.lora.scale_rule = "alpha/r"       # 'alpha/r' (client rank) | 'alpha/r_max' | 'rslora'
  c.lora.init_from = placeholder(str)  # a PEFT LoRA directory (HF module names) as the starting global
                                      # adapter, rescaled to this run's scale at r_max (docs/export.md);
                                      # None / "" = a fresh init

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
  c.client.clip_norm = 0.0            # clip each client's factor update to this norm (0 = off; DP needs it)

  c.server = ml_collections.ConfigDict()
  c.server.rounds = 10
  c.server.clients_per_round = 5
  c.server.max_update_norm = 1e3      # exclude an upload whose factor update norm exceeds this (0 = no
                                      # bound); non-finite uploads are always excluded

  c.privacy = ml_collections.ConfigDict()  # client-level DP-FedAvg (homlora, zero_pad, ffa_lora)
  c.privacy.noise_multiplier = 0.0    # z: noise std z * client.clip_norm / K on the average (0 = off)
  c.privacy.delta = 1e-5              # epsilon is reported at this delta

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1
  c.eval.batch_size = 64
  c.eval.at_start = False             # also evaluate the initial model (a round-0 metrics row)
  # Generation-based evaluation (language models): greedy answers to test prompts, ROUGE-L, exact match.
  c.eval.generate_examples = 0        # prompts answered per evaluation set (per task in turn); 0 = off
  c.eval.max_new_tokens = 32          # the answer budget (decoding stops at end-of-sequence)
  c.eval.answer_marker = ""           # exact match compares the text after this marker (e.g. "####")
  c.eval.samples_per_task = 2         # generations per task written to generations/round_<r>.jsonl
  # Multiple-choice evaluation (language models on data with answer options): options scored by log-likelihood.
  c.eval.choice_examples = 0          # examples scored per evaluation set (per task in turn); 0 = all
  return c


def llm_smoke(c: ml_collections.ConfigDict) -> None:
  """The ``:runlocal`` sizes every language-model config shares: a seconds-long smoke run."""
  c.client.local_steps = 2
  c.client.batch_size = 2
  c.model.max_len = 64
  c.eval.every = 1
  c.eval.batch_size = 4
  c.eval.generate_examples = 4
  c.eval.max_new_tokens = 8
  c.checkpoint_every = 1
