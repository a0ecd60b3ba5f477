"""Independent plain-numpy references: dense matrices, explicit loops, explicit padding."""

import numpy as np


def mask_vec(rank, r_max):
  return np.array([1.0 if i < rank else 0.0 for i in range(r_max)])


def scale(rank, alpha, rule, r_max):
  if rank == 0:
    return 0.0
  return {"alpha/r": alpha / rank, "alpha/r_max": alpha / r_max, "rslora": alpha / np.sqrt(rank)}[rule]


def dense_update(a, b, rank, s):
  """s * a[:, :rank] @ b[:rank, :] via an explicit slice (no masks)."""
  return s * np.asarray(a, np.float64)[:, :rank] @ np.asarray(b, np.float64)[:rank, :]


def pad_to(x_a, x_b, rank, r_max):
  """Explicitly rebuild a zero-padded [d_in, r_max] / [r_max, d_out] pair from the first rank slots."""
  d_in, d_out = x_a.shape[0], x_b.shape[1]
  a = np.zeros((d_in, r_max))
  b = np.zeros((r_max, d_out))
  for i in range(rank):
    a[:, i] = x_a[:, i]
    b[i, :] = x_b[i, :]
  return a, b


def weighted_average_padded(a_list, b_list, ranks, weights, r_max):
  a_out = 0.0
  b_out = 0.0
  for a, b, r, w in zip(a_list, b_list, ranks, weights):
    pa, pb = pad_to(np.asarray(a, np.float64), np.asarray(b, np.float64), r, r_max)
    a_out = a_out + w * pa
    b_out = b_out + w * pb
  return a_out, b_out
