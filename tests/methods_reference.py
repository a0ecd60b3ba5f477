"""Plain-numpy references for the method suite: float64, explicit loops, dense matrices."""

import numpy as np


def random_clients(rng, k, d_in, d_out, r_max, ranks):
  """Lists of float64 factors with slots >= rank zero: a [d_in, r_max], b [r_max, d_out]."""
  a_list, b_list = [], []
  for r in ranks:
    a = np.zeros((d_in, r_max))
    b = np.zeros((r_max, d_out))
    a[:, :r] = rng.normal(size=(d_in, r))
    b[:r, :] = rng.normal(size=(r, d_out))
    a_list.append(a)
    b_list.append(b)
  return a_list, b_list


def to_tree(a_list, b_list, name="q"):
  return {name: {"a": np.stack(a_list).astype(np.float32), "b": np.stack(b_list).astype(np.float32)}}


def rel_err(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def helora_pad_one(a, b, r, r_max, padding):
  """Pads one client slot by slot."""
  a_out, b_out = np.zeros_like(a), np.zeros_like(b)
  for j in range(r_max):
    if j < r:
      a_out[:, j], b_out[j, :] = a[:, j], b[j, :]
    elif padding == "linear":
      a_out[:, j] = sum(a[:, i] for i in range(r)) / r
      b_out[j, :] = sum(b[i, :] for i in range(r)) / r
    elif padding == "mean":
      a_out[:, j] = np.mean(a[:, :r])
      b_out[j, :] = np.mean(b[:r, :])
    elif padding == "adjacent":
      a_out[:, j], b_out[j, :] = a[:, r - 1], b[r - 1, :]
  return a_out, b_out


def helora_pad(a_list, b_list, ranks, n, padding, weighting, r_max):
  w = {"examples_x_rank": [nk * rk for nk, rk in zip(n, ranks)], "rank": list(ranks),
       "examples": list(n)}[weighting]
  total = sum(w)
  a_g, b_g = 0.0, 0.0
  for a, b, r, wk in zip(a_list, b_list, ranks, w):
    pa, pb = helora_pad_one(a, b, r, r_max, padding)
    a_g = a_g + wk / total * pa
    b_g = b_g + wk / total * pb
  return a_g, b_g


def weighted_update(a_list, b_list, ranks, n, scales):
  """sum_k p_k s_k a_k[:, :r_k] b_k[:r_k]: dense [d_in, d_out]."""
  total = sum(n)
  dw = 0.0
  for a, b, r, nk, s in zip(a_list, b_list, ranks, n, scales):
    dw = dw + (nk / total) * s * a[:, :r] @ b[:r, :]
  return dw


def best_rank(dw, r):
  """Best rank-r approximation by a dense SVD (Eckart–Young)."""
  u, s, vt = np.linalg.svd(dw, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


def kd_loss(logits, teacher, t):
  """t^2 KL(softmax(teacher/t) || softmax(logits/t)) per row, with explicit loops."""
  out = []
  for z, y in zip(np.asarray(logits, np.float64), np.asarray(teacher, np.float64)):
    p = np.exp(y / t - np.max(y / t))
    p /= p.sum()
    q = np.exp(z / t - np.max(z / t))
    q /= q.sum()
    out.append(t * t * sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q)))
  return np.array(out)
