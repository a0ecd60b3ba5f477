"""Exports the trained global adapter of a run for deployment tools.

  python launch/export.py --workdir workdirs/tweets --format peft --out exported/tweets_peft
  python launch/export.py --workdir workdirs/natinst --format gguf --out exported/natinst.gguf.d

Flags: ``--workdir`` (a run of launch/train.py; its newest checkpoint),
``--format`` (``peft``: a Hugging Face PEFT LoRA directory; ``gguf``: a
llama.cpp LoRA adapter), ``--out`` (a directory, refused if it holds files
unless ``--overwrite``), ``--group`` (HeLoRA-KD: which rank group, 0-based;
default the largest). Formats are modules ``hetlora.export.<format>``;
docs/export.md says what each writes and how to load it.
"""

import importlib
from pathlib import Path

from absl import app, flags, logging

from hetlora import export as export_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's working directory (launch/train.py --workdir).")
_FORMAT = flags.DEFINE_enum("format", "peft", list(export_lib.FORMATS), "Output format.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_GROUP = flags.DEFINE_integer("group", None, "Rank group to export (HeLoRA-KD); default: the largest.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = Path(_OUT.value)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not _OVERWRITE.value:
    raise app.UsageError(f"--out={out} exists and is not empty; pass an empty or new directory, or "
                         "--overwrite to write into it.")
  try:
    writer = importlib.import_module(f"hetlora.export.{_FORMAT.value}")
  except ModuleNotFoundError as e:
    raise app.UsageError(f"--format={_FORMAT.value}: hetlora.export.{_FORMAT.value} is not available "
                         f"({e}).") from None
  from hetlora.export import workdir_adapter   # jax, orbax: after the flags are checked
  adapter = workdir_adapter.from_workdir(_WORKDIR.value, group=_GROUP.value)
  for path in writer.export(adapter, out):
    print(path)


if __name__ == "__main__":
  app.run(main)
