"""FFA-LoRA: ``a`` frozen bit for bit (even under weight decay), ``b`` trained and averaged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

from hetlora import client as client_lib
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import server
from hetlora.models import tiny
import methods_reference as ref

R, D_IN, D_OUT = 2, 5, 3


def test_round_keeps_a_and_averages_b():
  model = tiny.Linear(D_OUT)
  base = tiny.init_params(model, jax.random.key(0), D_IN)
  spec = client_lib.LocalSpec(tiny.squared_loss(model), optax.adamw(0.05, weight_decay=0.1), alpha=4.0)
  method = methods.get("ffa_lora")
  global_lora = lora_lib.init(jax.random.key(1), base, "linear/kernel$", R)
  state = server.init(global_lora, np.full(3, R), method)
  rng = np.random.default_rng(0)
  data = {"batch": {"x": jnp.float32(rng.normal(size=(3, 3, 4, D_IN))),
                    "y": jnp.float32(rng.normal(size=(3, 3, 4, D_OUT)))},
          "mask": jnp.ones((3, 3, 4))}
  n = [2.0, 5.0, 1.0]
  round_fn = server.make_round(spec, method)
  new_state, result = round_fn(state, base, jnp.arange(3), data, jnp.array(n))

  a0 = np.asarray(global_lora["linear"]["a"])
  for k in range(3):
    np.testing.assert_array_equal(np.asarray(result.lora["linear"]["a"][k]), a0)
  np.testing.assert_array_equal(np.asarray(new_state.method_state["linear"]["a"]), a0)
  b_k = np.asarray(result.lora["linear"]["b"], np.float64)
  assert np.all(np.abs(b_k) > 0)
  want_b = sum(nk / sum(n) * b for nk, b in zip(n, b_k))
  assert ref.rel_err(new_state.method_state["linear"]["b"], want_b) <= 1e-5

  # Exact aggregation: the global update is the average of the clients' updates.
  s = float(lora_lib.scale(R, 4.0, "alpha/r", R))
  dw = s * a0.astype(np.float64) @ np.asarray(new_state.method_state["linear"]["b"], np.float64)
  assert ref.rel_err(dw, ref.weighted_update([a0] * 3, list(b_k), [R] * 3, n, [s] * 3)) <= 1e-5


def test_trainable_is_validated_and_mixed_ranks_refused():
  with pytest.raises(ValueError, match="trainable"):
    methods.Local(trainable="a")
  glob = {"m": {"a": jnp.zeros((2, 4)), "b": jnp.zeros((4, 3))}}
  with pytest.raises(ValueError, match="lora.rank_choices"):
    server.init(glob, np.array([2, 4]), methods.get("ffa_lora"))
