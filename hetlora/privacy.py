"""Client-level differential privacy for the methods whose aggregate is a plain average.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang. Learning Differentially Private
Recurrent Language Models. ICLR 2018, Alg. 1): every client's update is
clipped to norm ``C`` (:mod:`hetlora.screening`, on the factors), the server
averages the uploads with **uniform** weights over the included clients
(example counts would leak), and adds Gaussian noise to the average::

    x <- (1/K) sum_k (x_k^0 + clip(Delta_k, C)) + N(0, (z C / K)^2 I)

on every factor the clients train (``a`` and ``b``; ``b`` only for FFA-LoRA)
and on every dense trainable (:mod:`hetlora.dense`, e.g. a trained
classifier head). The head is part of the client's update: it is clipped
with the factors (one norm over both, :mod:`hetlora.screening`), averaged
with the same uniform weights, and noised with the same ``z C / K``, so the
Gaussian mechanism covers the whole upload (a head left un-noised would be
released without protection). The privacy spent after ``T`` rounds is
computed by ``dp-accounting``'s RDP accountant for ``T`` compositions of the
Poisson-subsampled Gaussian mechanism with sampling rate ``q = K / N`` and
noise multiplier ``z``, reported as ``epsilon`` at ``delta`` (our cohorts are fixed-size samples
without replacement; Poisson sampling at the same rate is the usual
approximation, as in DP-FedAvg's own analysis).

Which methods: the server's new factors must be a linear average of the
clients' factors from a shared start, so that one client moves the average by
at most ``C / K`` — HomLoRA, zero-padding (heterogeneous ranks, uniform
weights: the padding is data-independent) and FFA-LoRA (Sun et al., ICLR
2024: with ``a`` frozen the noise enters ``s a b`` linearly, while noise on
both factors also enters through the product of the two noises). Methods whose
weights depend on the updates (HetLoRA's norms), that factorise the product
(FlexLoRA's SVD), stack it (FLoRA) or distil on server data (HeLoRA-KD) have
no such bound: a method declares support with ``Method.dp_linear``.

Example:
  >>> round(epsilon(noise_multiplier=1.0, sampling_rate=0.1, rounds=100, delta=1e-5), 1)
  8.0
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hetlora import lora as lora_lib

LoRA = lora_lib.LoRA
RDP_ORDERS = tuple(range(2, 256))


@dataclasses.dataclass(frozen=True)
class Privacy:
  """DP-FedAvg options (``config.privacy``).

  Attributes:
    noise_multiplier: ``z``; the noise std of the average is ``z C / K``.
    clip_norm: ``C``, the clients' update bound (``config.client.clip_norm``).
    delta: the ``delta`` at which ``epsilon`` is reported.
  """
  noise_multiplier: float
  clip_norm: float
  delta: float = 1e-5

  def __post_init__(self):
    if self.noise_multiplier <= 0:
      raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier} must be > 0 (0 turns DP off).")
    if not self.clip_norm or self.clip_norm <= 0:
      raise ValueError("privacy.noise_multiplier > 0 needs client.clip_norm > 0: DP bounds each "
                       "client's update by clipping it (e.g. client.clip_norm=1.0).")
    if not 0 < self.delta < 1:
      raise ValueError(f"privacy.delta={self.delta} must be in (0, 1), e.g. 1e-5.")


def add_noise(privacy: Privacy, aggregated: LoRA, dense: Any, num_included: jax.Array, trainable: str,
              key: jax.Array) -> tuple[LoRA, Any]:
  """The averages plus ``N(0, (z C / K)^2)`` on every trained factor and every dense trainable.

  Args:
    privacy: the options; aggregated: the uniform average of the uploaded factors.
    dense: the uniform average of the uploaded dense trainables (``{}``: none).
    num_included: ``K``, the number of uploads averaged (``>= 1`` is used).
    trainable: ``'ab'`` or ``'b'``, the factors clients train (the others get no noise).
    key: a PRNG key for this round's noise.

  Returns:
    ``(aggregated, dense)`` with their noise.
  """
  std = privacy.noise_multiplier * privacy.clip_norm / jnp.maximum(num_included, 1).astype(jnp.float32)
  trained = lambda path: getattr(path[-1], "key", None) in tuple(trainable)
  return (_gaussian(aggregated, std, key, trained),
          _gaussian(dense, std, jax.random.fold_in(key, 1), lambda path: True))


def _gaussian(tree: Any, std: jax.Array, key: jax.Array, noised: Callable[[tuple], bool]) -> Any:
  """``tree`` plus ``N(0, std^2)`` on each leaf whose key path ``noised`` accepts."""
  leaves, treedef = jax.tree.flatten_with_path(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [x + std * jax.random.normal(k, x.shape, x.dtype) if noised(path) else x
         for (path, x), k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
  """``epsilon`` spent after ``rounds`` rounds at ``delta`` (RDP of the subsampled Gaussian)."""
  from dp_accounting import dp_event
  from dp_accounting.rdp import rdp_privacy_accountant

  if rounds == 0:
    return 0.0
  accountant = rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS)
  event = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
  accountant.compose(event, rounds)
  return float(accountant.get_epsilon(delta))
