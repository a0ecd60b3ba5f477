"""Federated data: sources, tokenization, partitioning and cohort packing.

Typical flow::

    from hetlora import data
    train = data.get_source('banking77', split='train')
    cols = data.tokenize_dataset(train, encode_fn, max_len=64)
    parts = data.dirichlet(train.labels, num_clients=100, alpha=0.5, seed=0)
    rnd = data.pack_cohort(cols, [parts[c] for c in cohort], batch_size=16,
                           local_epochs=1, seed=0, round_idx=r, client_ids=cohort)
    print(data.format_statistics(data.data_statistics(cols, test_cols, parts)))  # cut / empty examples
"""

from hetlora.data.packing import batches
from hetlora.data.packing import cohort_indices
from hetlora.data.packing import epoch_steps
from hetlora.data.packing import pack_cohort
from hetlora.data.images import ImageDataset
from hetlora.data.images import mnist
from hetlora.data.partition import ClientStats
from hetlora.data.partition import client_stats
from hetlora.data.partition import dirichlet
from hetlora.data.partition import format_stats
from hetlora.data.partition import iid
from hetlora.data.partition import make_partition
from hetlora.data.partition import natural
from hetlora.data.partition import shards
from hetlora.data.partition import validate_partition
from hetlora.data.sources import PromptDataset
from hetlora.data.sources import SOURCES
from hetlora.data.sources import TextDataset
from hetlora.data.sources import align_labels
from hetlora.data.sources import banking77
from hetlora.data.sources import get_source
from hetlora.data.sources import instruction_prompt
from hetlora.data.sources import instructions
from hetlora.data.sources import load_csv
from hetlora.data.sources import load_jsonl
from hetlora.data.sources import natinst
from hetlora.data.sources import natinst_task
from hetlora.data.sources import tfds_source
from hetlora.data.sources import tweets
from hetlora.data.stats import data_statistics
from hetlora.data.stats import format_statistics
from hetlora.data.stats import statistics
from hetlora.data.tokenize import tokenize_dataset
from hetlora.data.tokenize import tokenize_prompts
from hetlora.data.tokenize import tokenize_prompts_only

__all__ = [
    "ClientStats", "ImageDataset", "PromptDataset", "SOURCES", "TextDataset", "align_labels", "banking77", "batches",
    "client_stats", "cohort_indices", "data_statistics", "dirichlet", "epoch_steps", "format_statistics",
    "format_stats", "get_source", "iid", "instruction_prompt", "instructions", "load_csv", "load_jsonl",
    "make_partition", "mnist", "natinst", "natinst_task", "natural", "pack_cohort", "shards", "statistics",
    "tfds_source", "tokenize_dataset", "tokenize_prompts",
    "tokenize_prompts_only", "tweets", "validate_partition",
]
