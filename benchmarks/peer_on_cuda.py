"""Runs the PyTorch + PEFT peer unchanged, its models and batches on CUDA.

The peer (``../shared/peer/torch_hetlora.py``) trains on the CPU only. On a
GPU machine this launcher loads it as a module and moves its work to the GPU
the way a PyTorch user would, without editing it:

- every PEFT model (:func:`make_peft`, the server's and each rank's) is moved
  to the GPU, with a forward pre-hook that moves the keyword inputs (token ids,
  masks, labels) there;
- the HetLoRA aggregation allocates its sums on the GPU (``torch.device``
  as the default device while it runs);
- evaluation (after the timed round) brings the logits back to the CPU, where
  the peer compares them with its numpy labels.

Without CUDA the same code runs on the CPU (for a dry run). Usage, as the peer's
interpreter (``--python`` of ``benchmarks/peer_comparison.py`` takes a wrapper
that runs this file)::

    python benchmarks/peer_on_cuda.py ../shared/peer/torch_hetlora.py --clients-per-round 32 ...
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch


def _to_device(device):
  """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook moving tensor inputs to ``device``."""
  move = lambda x: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
  return lambda module, args, kwargs: (tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()})


class _CpuLogits:
  """A model whose outputs carry CPU logits (all the peer's evaluation reads)."""

  def __init__(self, model):
    self.model = model

  def eval(self):
    self.model.eval()
    return self

  def __call__(self, **batch):
    return types.SimpleNamespace(logits=self.model(**batch).logits.cpu())


def patch(peer: types.ModuleType, device: torch.device) -> None:
  """Moves the peer module's models, batches and aggregation to ``device``."""
  make_peft, aggregate, evaluate = peer.make_peft, peer.hetlora_aggregate, peer.evaluate

  def make_peft_on_device(base, r, args):
    model = make_peft(base, r, args).to(device)
    model.register_forward_pre_hook(_to_device(device), with_kwargs=True)
    return model

  def aggregate_on_device(*args, **kwargs):
    with torch.device(device):
      return aggregate(*args, **kwargs)

  peer.make_peft = make_peft_on_device
  peer.hetlora_aggregate = aggregate_on_device
  peer.evaluate = lambda model, *args: evaluate(_CpuLogits(model), *args)


def main(argv: list[str]) -> None:
  path, peer_args = argv[0], argv[1:]
  spec = importlib.util.spec_from_file_location("torch_hetlora", path)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  patch(peer, device)
  print(f"peer on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'no CUDA'})",
        file=sys.stderr, flush=True)
  peer.main(peer_args)


if __name__ == "__main__":
  main(sys.argv[1:])
