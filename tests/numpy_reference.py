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


def _norm(x):
  return float(np.sqrt(np.sum(x ** 2)))


def tail_slots(rank, gamma, r_max):
  t = int(np.floor(np.float32(gamma) * np.float32(rank)))
  return [i for i in range(r_max) if t <= i < rank]


def tail_score(a, b, rank, gamma):
  idx = tail_slots(rank, gamma, a.shape[1])
  return _norm(b[idx, :]) * _norm(a[:, idx])


def linear_local_sgd(w0, a, b, rank, xs, ys, masks, lr, s, lam=0.0, gamma=0.99, prune=False, r_min=1):
  """SGD on y = x (W0 + s a[:, :r] b[:r]) with per-example 0.5||.||^2, masked mean per step.

  xs: [steps, B, d_in], ys: [steps, B, d_out], masks: [steps, B]. The regulariser
  lam * ||b_tail||_F ||a_tail||_F is differentiated by hand. Returns (a, b, new_rank, mean_loss).
  """
  a, b = pad_to(np.asarray(a, np.float64), np.asarray(b, np.float64), rank, a.shape[1])
  r_max = a.shape[1]
  score_before = tail_score(a, b, rank, gamma)
  loss_sum, count = 0.0, 0.0
  for x, y, m in zip(xs, ys, masks):
    n = float(np.sum(m))
    if n == 0:
      continue
    w = w0 + s * a[:, :rank] @ b[:rank, :]
    resid = x @ w - y
    loss_sum += float(np.sum(0.5 * np.sum(resid ** 2, axis=1) * m))
    count += n
    g = x.T @ (resid * m[:, None]) / n
    ga = np.zeros_like(a)
    gb = np.zeros_like(b)
    ga[:, :rank] = s * g @ b[:rank, :].T
    gb[:rank, :] = s * a[:, :rank].T @ g
    idx = tail_slots(rank, gamma, r_max)
    if lam > 0 and idx:
      na, nb = _norm(a[:, idx]), _norm(b[idx, :])
      if na > 0 and nb > 0:
        ga[:, idx] += lam * nb * a[:, idx] / na
        gb[idx, :] += lam * na * b[idx, :] / nb
    a = a - lr * ga
    b = b - lr * gb
  new_rank = rank
  if prune and tail_score(a, b, rank, gamma) < score_before:
    new_rank = min(rank, max(r_min, int(np.floor(np.float32(gamma) * np.float32(rank)))))
  a, b = pad_to(a, b, new_rank, r_max)
  return a, b, new_rank, loss_sum / max(count, 1.0)
