"""Every method runs through the server's round; ranks change without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import aggregation
from hetlora import client as client_lib
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import server
from hetlora.models import tiny

D_IN, R_MAX = 4, 4


def test_names_and_errors():
  assert methods.names() == sorted(["fedavg", "homlora", "zero_pad", "hetlora", "helora_pad",
                                    "flexlora", "flora", "ffa_lora", "helora_kd"])
  with pytest.raises(ValueError, match="unknown"):
    methods.get_method("fedprox")
  with pytest.raises(TypeError, match="flexlora"):
    methods.get_method("flexlora", padding="mean")


@pytest.mark.parametrize("name", ["fedavg", "zero_pad", "hetlora", "helora_pad", "flexlora",
                                  "flora", "ffa_lora"])
def test_round_runs_and_does_not_recompile(name):
  model = tiny.MLPClassifier(hidden=(6,), num_classes=3)
  base = tiny.init_params(model, jax.random.key(0), D_IN)
  spec = client_lib.LocalSpec(tiny.classification_loss(model), optax.sgd(0.05), alpha=8.0)
  method = methods.get_method(name)
  state = server.init(lora_lib.init(jax.random.key(1), base, "kernel$", R_MAX),
                      np.array([1, 2, 4]), method=method)
  rng = np.random.default_rng(0)
  data = {"batch": {"x": jnp.float32(rng.normal(size=(3, 2, 4, D_IN))),
                    "label": jnp.int32(rng.integers(0, 3, size=(3, 2, 4)))},
          "mask": jnp.ones((3, 2, 4))}
  round_fn = server.make_round(spec, None, method=method)
  cohort = jnp.arange(3)
  for i in range(2):
    state, result = round_fn(state, base, cohort, data, jnp.ones(3), key=jax.random.key(i))
    state = state.replace(client_ranks=jnp.array([2, 3, 1], jnp.int32))
  assert round_fn._cache_size() == 1
  assert np.all(np.isfinite(np.asarray(result.loss)))
  eff = method.fold_global(state.lora, 8.0, "alpha/r")
  logits = model.apply({"params": server.effective_base(state, base), "lora": eff}, data["batch"]["x"][0, 0])
  assert np.all(np.isfinite(np.asarray(logits)))


def test_make_round_without_method_is_unchanged():
  model = tiny.Linear(2)
  base = tiny.init_params(model, jax.random.key(0), 3)
  spec = client_lib.LocalSpec(tiny.squared_loss(model), optax.sgd(0.1), alpha=1.0)
  state = server.init(lora_lib.init(jax.random.key(1), base, "kernel$", 2), np.array([1, 2]))
  assert state.base_delta is None
  data = {"batch": {"x": jnp.ones((2, 1, 2, 3)), "y": jnp.ones((2, 1, 2, 2))}, "mask": jnp.ones((2, 1, 2))}
  agg = aggregation.get("zero_pad")
  new_old, _ = server.make_round(spec, agg)(state, base, jnp.arange(2), data, jnp.ones(2))
  new_m, _ = server.make_round(spec, None, method=methods.get_method("zero_pad"))(
      state, base, jnp.arange(2), data, jnp.ones(2))
  jax.tree.map(np.testing.assert_array_equal, new_old.lora, new_m.lora)
