"""Our PEFT export, loaded by the real consumer: transformers + PEFT (CPU torch) vs our JAX model.

For each model (a tiny random BERT, a tiny random RoBERTa (``RobertaModel``:
positions shifted past the padding id), all-MiniLM-L6-v2, a tiny random Llama,
SmolLM2-135M-Instruct from its Q4_1 GGUF) it builds a random adapter on every
linear projection with a different rank per module (``a`` and ``b`` nonzero),
exports it with :mod:`hetlora.export.peft`, and in a separate torch venv runs
``PeftModel.from_pretrained(base, dir)`` with every Python warning and every
``transformers`` / ``peft`` log warning raised as an error (a missing or
misnamed module is such a warning). Both sides run the same token ids:

- BERT: the encoder's ``last_hidden_state: [B, L, H]`` (``AutoModel``, i.e.
  ``BertModel``; our ``BertModel``), padded second row, and the classifier
  logits ``[B, C]``: the adapter carries a random head as PEFT's
  ``modules_to_save``, loaded into a ``classifier = nn.Linear(H, C)`` attached
  to the ``BertModel`` (random before the load) and applied to the mean-pooled
  ``last_hidden_state`` (our ``BertClassifier``, ``pooling='mean'``);
- Llama: the logits ``[B, L, V]`` (``AutoModelForCausalLM``; our ``Llama``).

Reported per model: ``max |ours - PEFT|`` of the adapted outputs, ``max |base
- adapted|`` (the adapter's effect; it must be far larger), the PEFT layers
found and their ranks. Results go to ``benchmarks/results/peft_roundtrip.{json,md}``.

Set up the torch venv once (offline; versions of ../shared/peer/requirements-peer.txt)::

    python3 -m venv ../torch-venv && ../torch-venv/bin/pip install -r benchmarks/requirements-torch.txt
    .venv/bin/python benchmarks/peft_roundtrip.py --python ../torch-venv/bin/python

Trains nothing. Takes about 2 minutes on 2 CPU cores (SmolLM2 dominates).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hetlora import lora as lora_lib
from hetlora.export import Adapter, peft
from hetlora.models import bert, bert_loading, files, gguf_loading, llama, testing

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Pass criterion: ours vs PEFT within RTOL of the output's largest magnitude, and the adapter's effect
# (base vs adapted) at least MIN_EFFECT_RATIO times that difference.
RTOL = 1e-4
MIN_EFFECT_RATIO = 1e3
HEAD_LABELS = 5   # classes of the BERT cases' head (PEFT modules_to_save)
BERT_PATTERN = r"attention/(query|key|value|output)/kernel$|mlp/(intermediate|output)/kernel$"
LLAMA_PATTERN = r"attn/(q|k|v|o)_proj/kernel$|mlp/(gate|up|down)_proj/kernel$|lm_head/kernel$"

CHILD = textwrap.dedent('''
    import json, logging, sys, warnings
    warnings.simplefilter("error")                    # a PEFT key mismatch is a warnings.warn ...
    for deprecation in (DeprecationWarning, FutureWarning):   # ... library deprecation notices are not
      warnings.filterwarnings("default", category=deprecation)
    import numpy as np, torch, transformers, peft
    job = json.loads(sys.argv[1])
    torch.manual_seed(0)
    auto = getattr(transformers, job["auto_class"])
    kwargs = {"gguf_file": job["gguf_file"]} if job["gguf_file"] else {}
    with warnings.catch_warnings(record=True) as base_warnings:   # the base load may warn (a missing pooler)
      warnings.simplefilter("always")
      model = auto.from_pretrained(job["base"], torch_dtype=torch.float32, **kwargs).eval()
    ids = torch.tensor(job["ids"]); mask = torch.tensor(job["mask"])
    if job["head"]:   # the head's slot, random until PEFT loads the adapter's modules_to_save into it
      model.classifier = torch.nn.Linear(model.config.hidden_size, job["head"])
    def run(m):
      with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask)
      return (out.last_hidden_state if job["output"] == "hidden" else out.logits).float().numpy()
    def head_logits(m):   # the classifier on the mean-pooled last_hidden_state
      w = mask[..., None].float()
      with torch.no_grad():
        pooled = (m(input_ids=ids, attention_mask=mask).last_hidden_state * w).sum(1) / w.sum(1)
        return m.classifier(pooled).float().numpy()
    base = run(model)
    base_logits = head_logits(model) if job["head"] else np.zeros(0)

    class Raise(logging.Handler):
      def emit(self, record):
        raise RuntimeError(f"{record.name} logged a warning: {record.getMessage()}")
    for name in ("transformers", "peft"):
      logging.getLogger(name).addHandler(Raise(level=logging.WARNING))
    transformers.utils.logging.set_verbosity_warning()
    with warnings.catch_warnings(record=True) as load_warnings:
      warnings.simplefilter("always")
      adapted_model = peft.PeftModel.from_pretrained(model, job["adapter"])
    fatal = [w for w in load_warnings if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if fatal:
      raise RuntimeError(f"PeftModel.from_pretrained warned: {fatal[0].category.__name__}: {fatal[0].message}")
    adapted = run(adapted_model)
    logits = head_logits(adapted_model) if job["head"] else np.zeros(0)
    layers = {n: int(m.r["default"]) for n, m in adapted_model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    np.savez(job["out"], base=base, adapted=adapted, base_logits=base_logits, logits=logits)
    print(json.dumps({"layers": layers, "base_warnings": [str(w.message)[:200] for w in base_warnings],
                      "deprecations_on_load": sorted({str(w.message)[:120] for w in load_warnings}),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "peft": peft.__version__}}))
''')


def random_adapter(like: dict, rng: np.random.Generator, r_max: int, alpha: float, rule: str,
                   kind: str, name: str) -> Adapter:
  """Random nonzero factors, ranks cycling over ``[1, r_max]`` by module, scale of each module's rank."""
  modules, ranks, scales = {}, {}, {}
  for i, (path, mod) in enumerate(sorted(lora_lib.modules(like).items())):
    d_in, d_out = mod["a"].shape[0], mod["b"].shape[1]
    r = 1 + (3 * i) % r_max
    a = np.zeros((d_in, r_max), np.float32)
    b = np.zeros((r_max, d_out), np.float32)
    a[:, :r] = rng.normal(0, 1 / np.sqrt(d_in), (d_in, r))
    b[:r] = rng.normal(0, 0.3 / np.sqrt(r), (r, d_out))
    modules[path], ranks[path] = {"a": a, "b": b}, r
    scales[path] = float(lora_lib.scale(r, alpha, rule, r_max))
  return Adapter(modules=modules, ranks=ranks, scales=scales, scale_rule=rule, alpha=alpha, r_max=r_max,
                 model_kind=kind, model_name=name)


def random_head(rng: np.random.Generator, hidden: int, num_labels: int) -> dict[str, np.ndarray]:
  """A classifier head as ``Adapter.extra`` holds it: ``classifier/kernel: [H, C]``, ``classifier/bias``."""
  return {"classifier/kernel": rng.normal(0, 0.5, (hidden, num_labels)).astype(np.float32),
          "classifier/bias": rng.normal(0, 0.5, num_labels).astype(np.float32)}


def folded(adapter: Adapter) -> dict:
  """Our model's ``'lora'`` collection: ``a_eff = s a[:, :r]``, ``b[:r]`` (nested by module path)."""
  out: dict = {}
  for path, mod in adapter.modules.items():
    r, s = adapter.ranks[path], adapter.scales[path]
    node = out
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node.update(a=jnp.asarray(mod["a"][:, :r] * s), b=jnp.asarray(mod["b"][:r]))
  return out


def case_bert(name: str, model_dir: Path, rule: str, rng) -> dict:
  config, params = bert_loading.load_bert(model_dir)
  like = lora_lib.init(jax.random.key(0), params, BERT_PATTERN, 8)
  adapter = random_adapter(like, rng, 8, 16.0, rule, "bert_classifier", str(model_dir))
  head_rng = np.random.default_rng([1, config.hidden_size])   # leaves the adapters' draws as they were
  adapter = dataclasses.replace(adapter, extra=random_head(head_rng, config.hidden_size, HEAD_LABELS))
  ids = rng.integers(5, min(config.vocab_size, 1000), (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  ids[1, 9:] = config.pad_token_id
  model = bert.BertModel(config)
  ours = lambda lora: np.asarray(model.apply({"params": params, "lora": lora}, ids, mask))
  classifier = bert.BertClassifier(config, HEAD_LABELS, pooling="mean")
  head = {"kernel": adapter.extra["classifier/kernel"], "bias": adapter.extra["classifier/bias"]}
  variables = {"params": {**params, "classifier": head}, "lora": folded(adapter)}
  logits = np.asarray(classifier.apply(variables, ids, mask))
  return dict(name=name, adapter=adapter, ids=ids, mask=mask, ours_base=ours({}),
              ours=ours(folded(adapter)), base=str(model_dir), gguf_file=None, auto_class="AutoModel",
              output="hidden", rule=rule, head=HEAD_LABELS, ours_logits=logits)


def case_llama(name: str, path: Path, rule: str, rng) -> dict:
  config, params = gguf_loading.load(path)
  like = lora_lib.init(jax.random.key(0), params, LLAMA_PATTERN, 8)
  adapter = random_adapter(like, rng, 8, 16.0, rule, "llama_lm", str(path))
  ids = rng.integers(3, min(config.vocab_size, 1000), (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  model = llama.Llama(config)
  ours = lambda lora: np.asarray(model.apply({"params": params, "lora": lora}, ids, mask))
  gguf = path.suffix == ".gguf"
  return dict(name=name, adapter=adapter, ids=ids, mask=mask, ours_base=ours({}),
              ours=ours(folded(adapter)), base=str(path.parent if gguf else path),
              gguf_file=path.name if gguf else None, auto_class="AutoModelForCausalLM", output="logits",
              rule=rule, head=0)


def flax_named_copy(adapter_dir: Path, out_dir: Path) -> None:
  """The negative control: the same adapter under our Flax paths (what the old ``lora.to_peft`` wrote)."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(adapter_dir / peft.ADAPTER_FILE))
  renamed = {}
  for key, value in tensors.items():
    if not key.endswith((peft.SUFFIX_A, peft.SUFFIX_B)):   # the head (modules_to_save) keeps its name
      renamed[key] = value
      continue
    name = key[len(peft.PREFIX):-len(peft.SUFFIX_A)]
    path = bert_loading.flax_module_path(name) or gguf_loading.flax_module_path(name)
    renamed[peft.PREFIX + path.replace("/", ".") + key[-len(peft.SUFFIX_A):]] = value
  out_dir.mkdir(parents=True)
  save_file(renamed, str(out_dir / peft.ADAPTER_FILE), metadata={"format": "pt"})
  (out_dir / peft.CONFIG_FILE).write_text((adapter_dir / peft.CONFIG_FILE).read_text())


def run_peft(python: str, case: dict, work: Path, control: bool = False) -> dict:
  adapter_dir = work / case["name"] / "adapter"
  peft.export(case["adapter"], adapter_dir)
  if control:
    flax_named_copy(adapter_dir, work / case["name"] / "flax_named")
    adapter_dir = work / case["name"] / "flax_named"
  job = {"auto_class": case["auto_class"], "base": case["base"], "gguf_file": case["gguf_file"],
         "adapter": str(adapter_dir), "ids": case["ids"].tolist(), "mask": case["mask"].tolist(),
         "output": case["output"], "head": case["head"], "out": str(work / case["name"] / "out.npz")}
  proc = subprocess.run([python, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                        env={**os.environ, "OMP_NUM_THREADS": "2"})
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
            "stderr": proc.stderr[-3000:]}
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  out = np.load(job["out"])
  a = case["adapter"]
  expected = {peft_name: a.ranks[p] for p, peft_name in peft._names(a).items()}   # pylint: disable=protected-access
  found = {n.removeprefix("base_model.model."): r for n, r in info["layers"].items()}
  ours, theirs = case["ours"], out["adapted"]
  diff = float(np.max(np.abs(ours - theirs)))
  effect = float(np.max(np.abs(out["adapted"] - out["base"])))
  base_diff = float(np.max(np.abs(case["ours_base"] - out["base"])))
  scale = float(np.max(np.abs(ours)))
  ok = (found == expected and diff <= RTOL * scale and effect >= MIN_EFFECT_RATIO * diff)
  head = {}
  if case["head"]:   # the modules_to_save head: PEFT's logits are ours, far from the random slot's
    head_diff = float(np.max(np.abs(case["ours_logits"] - out["logits"])))
    head_effect = float(np.max(np.abs(out["logits"] - out["base_logits"])))
    head_scale = float(np.max(np.abs(case["ours_logits"])))
    ok = ok and head_diff <= RTOL * head_scale and head_effect >= MIN_EFFECT_RATIO * head_diff
    head = {"head_labels": case["head"], "max_abs_diff_logits_ours_vs_peft": head_diff,
            "max_abs_logits_loaded_vs_random_head": head_effect, "max_abs_logits": head_scale}
  return {"ok": bool(ok), **head, "max_abs_diff_ours_vs_peft": diff, "max_abs_diff_base_models": base_diff,
          "max_abs_effect_of_adapter": effect, "max_abs_output": scale,
          "modules": len(expected), "ranks_match": found == expected,
          "distinct_ranks": sorted(set(expected.values())), "versions": info["versions"],
          "base_load_warnings": info["base_warnings"],
          "deprecations_on_peft_load": info["deprecations_on_load"]}


def machine() -> str:
  cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), platform.processor())
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--python", default=os.environ.get("TORCH_PYTHON"),
                      help="the torch venv's interpreter (or $TORCH_PYTHON), e.g. ../torch-venv/bin/python")
  parser.add_argument("--only", nargs="*", help="run only these cases")
  args = parser.parse_args()
  if not args.python:
    parser.error("pass --python (the interpreter of a venv made from benchmarks/requirements-torch.txt)")
  rng = np.random.default_rng(0)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    makers = {
        "tiny-bert (alpha/r)": lambda: case_bert("tiny-bert", testing.write_tiny_bert(work / "tb"),
                                                 "alpha/r", rng),
        "tiny-roberta (alpha/r)": lambda: case_bert("tiny-roberta", testing.write_tiny_roberta(work / "tr"),
                                                    "alpha/r", rng),
        "all-MiniLM-L6-v2 (rslora)": lambda: case_bert("minilm", files.resolve("all-minilm-l6-v2"),
                                                       "rslora", rng),
        "tiny-llama (alpha/r_max)": lambda: case_llama("tiny-llama", testing.write_tiny_llama(work / "tl"),
                                                       "alpha/r_max", rng),
        "SmolLM2-135M GGUF Q4_1 (alpha/r)": lambda: case_llama(
            "smollm2", files.resolve("smollm2-135m-instruct"), "alpha/r", rng),
    }
    for label, make in makers.items():
      if args.only and not any(o in label for o in args.only):
        continue
      try:
        case = make()
      except FileNotFoundError as e:
        results[label] = {"ok": False, "error": f"skipped: {e}"}
        continue
      results[label] = run_peft(args.python, case, work)
      if label.startswith("tiny-bert"):   # negative control: PEFT must refuse our old Flax names
        control = run_peft(args.python, case, work / "control", control=True)
        results["control: tiny-bert under Flax names"] = {
            "ok": "error" in control, "detected": control.get("error", "NOT DETECTED")}
      print(label, json.dumps({k: v for k, v in results[label].items() if k != "stderr"}), flush=True)
  write(results)
  return 0 if all(r.get("ok") for r in results.values()) else 1


def write(results: dict) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  meta = {"machine": machine(), "date": datetime.date.today().isoformat(), "rtol": RTOL,
          "min_effect_ratio": MIN_EFFECT_RATIO, "python": sys.version.split()[0]}
  (RESULTS / "peft_roundtrip.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
  versions = next((r["versions"] for r in results.values() if "versions" in r), {})
  lines = [
      "# PEFT round trip: our export loaded by transformers + PEFT",
      "",
      f"{meta['machine']}; {meta['date']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
      "(`benchmarks/peft_roundtrip.py`). BERT compares `last_hidden_state`, Llama the logits; pass = "
      f"ours vs PEFT within {RTOL:g} x max|output|, and the adapter's effect >= {MIN_EFFECT_RATIO:g} x "
      "that difference, every target module wrapped at its rank, no warning on load. The BERT adapters "
      f"carry a {HEAD_LABELS}-class head as `modules_to_save`, loaded into a `classifier` Linear attached "
      "to the `BertModel` and applied to the mean-pooled output: its logits pass the same test against "
      "ours, the effect being loaded vs the slot's random init (head columns). The control row "
      "loads the tiny-BERT adapter under our Flax names (the old `lora.to_peft`): it must be refused.",
      "",
      "| model | modules (ranks) | max abs ours vs PEFT | max abs base vs adapted | max abs output | "
      "head logits: max abs ours vs PEFT | head logits: loaded vs random | ok |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for label, r in results.items():
    if "detected" in r:
      lines.append(f"| {label} | - | refused: {r['detected'][:110]} | - | - | - | - | "
                   f"{'yes' if r['ok'] else 'no'} |")
      continue
    if "error" in r:
      lines.append(f"| {label} | - | {r['error'][:120]} | - | - | - | - | no |")
      continue
    head = (f"{r['max_abs_diff_logits_ours_vs_peft']:.2e} | {r['max_abs_logits_loaded_vs_random_head']:.2e}"
            if "head_labels" in r else "- | -")
    lines.append(f"| {label} | {r['modules']} ({min(r['distinct_ranks'])}..{max(r['distinct_ranks'])}) | "
                 f"{r['max_abs_diff_ours_vs_peft']:.2e} | {r['max_abs_effect_of_adapter']:.2e} | "
                 f"{r['max_abs_output']:.2e} | {head} | {'yes' if r['ok'] else 'no'} |")
  (RESULTS / "peft_roundtrip.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  sys.exit(main())
