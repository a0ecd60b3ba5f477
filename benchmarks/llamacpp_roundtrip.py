"""llama.cpp applies our GGUF LoRA adapter as our JAX model does (SmolLM2-135M-Instruct).

A random heterogeneous-rank adapter (every projection of every layer, ranks
drawn from ``1..r_max``, non-zero garbage in the unused slots that export
must drop, scales from ``--scale-rule``) is exported with
:mod:`hetlora.export.gguf` and evaluated, on the same token ids, by

- ours: :class:`hetlora.models.llama.Llama` on the Q4_1 GGUF's weights
  dequantised to float32, without and with the adapter;
- llama.cpp: ``llama_cpp.Llama(model_path=..., lora_path=...)``
  (llama-cpp-python in its own interpreter, ``--python``), without and with,
  on two base files:

  - ``f32``: the same weights, dequantised and written as a float32 GGUF by
    this script (float32 KV cache): llama.cpp then computes what we compute,
    so this is the exactness check of the file;
  - ``q4_1``: the shipped Q4_1 GGUF with llama.cpp's defaults (the deployment):
    llama.cpp multiplies the 4-bit weights with activations rounded to 8 bits
    and keeps an fp16 KV cache, so its logits carry that rounding; the
    adapter's effect ``adapted - base``, taken on each side, is compared too.

Reported per base, over all positions and vocabulary entries of the prompts:

- ``raw``: max ``|ours - llama.cpp|`` of the logits (``base`` row: no adapter);
- ``effect_diff`` / ``effect_diff_mean``: max / mean of
  ``|(ours_adapted - ours_base) - (cpp_adapted - cpp_base)|``;
- ``effect_rel``: ``||effect_ours - effect_cpp|| / ||effect_ours||`` (Frobenius);
- ``effect``: max ``|ours_adapted - ours_base|``, which must be far larger;
- ``top1``: share of positions whose arg-max token agrees with ours.

Two controls show the check is sensitive: the same adapter written without the
Q/K row permutation (``no_qk_permute``), and without folding the per-module
scale into the factors (``no_scale_fold``); both must fail the ``f32`` tolerance.

Set up llama-cpp-python once (~15-40 CPU-minutes to build)::

    python3 -m venv ../llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 ../llamacpp-venv/bin/pip install -r benchmarks/requirements-llamacpp.txt

Run (~3 minutes on 2 cores; exits 1 when a check fails)::

    python benchmarks/llamacpp_roundtrip.py [--python ../llamacpp-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "smollm2-135m-instruct"
PROMPTS = ("What is the capital of France?",
           "Write a haiku about federated learning.",
           "List three prime numbers and explain why each is prime.",
           "Translate 'good morning' into Spanish.")
# Tolerances on |logit| differences (see the module docstring).
F32_TOL = 1e-3          # raw and effect_diff, float32 base: only summation order differs
Q4_1_RAW_TOL = 4.0      # raw, Q4_1 base: llama.cpp's 8-bit activations (its no-adapter gap is ~2.6)
Q4_1_EFFECT_MEAN_TOL = 0.5   # effect_diff_mean, Q4_1 base
Q4_1_TOP1_MIN = 0.9     # top1 agreement, Q4_1 base with the adapter


# ---- the llama-cpp-python side (runs in --python; needs only numpy and llama_cpp) ----

def worker(args) -> None:
  """Logits of every prompt for each run of ``args.runs`` (JSON: ``[[tag, model, lora or "", kv], ...]``)."""
  import llama_cpp
  ids = dict(np.load(args.ids))
  out = {"llama_cpp_version": np.array(llama_cpp.__version__)}
  for tag, model, lora, kv in json.loads(Path(args.runs).read_text()):
    cache = {"type_k": 0, "type_v": 0} if kv == "f32" else {}          # 0: GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=model, lora_path=lora or None, logits_all=True, n_ctx=args.n_ctx,
                          seed=0, n_threads=args.threads, verbose=False, **cache)
    for key, tokens in ids.items():
      llm.reset()
      llm.eval(tokens.tolist())
      out[f"{tag}/{key}"] = np.array(llm.scores[:len(tokens)], np.float32)
    del llm
  np.savez(args.out, **out)


# ---- our side ----

def random_adapter(cfg, model_path, r_max, alpha, scale_rule, b_std, seed):
  """A random ``Adapter`` on all 7 projections of every layer, ranks in ``1..r_max``."""
  from hetlora import lora as lora_lib
  from hetlora.export import Adapter
  rng = np.random.default_rng(seed)
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  shapes = {"attn/q_proj": (cfg.d_model, q), "attn/k_proj": (cfg.d_model, kv),
            "attn/v_proj": (cfg.d_model, kv), "attn/o_proj": (q, cfg.d_model),
            "mlp/gate_proj": (cfg.d_model, cfg.ffn), "mlp/up_proj": (cfg.d_model, cfg.ffn),
            "mlp/down_proj": (cfg.ffn, cfg.d_model)}
  modules, ranks, scales = {}, {}, {}
  for i in range(cfg.n_layers):
    for name, (d_in, d_out) in shapes.items():
      path = f"layers_{i}/{name}"
      modules[path] = {"a": (rng.normal(size=(d_in, r_max)) / np.sqrt(d_in)).astype(np.float32),
                       "b": (b_std * rng.normal(size=(r_max, d_out))).astype(np.float32)}
      ranks[path] = int(rng.integers(1, r_max + 1))
      scales[path] = float(lora_lib.scale(ranks[path], alpha, scale_rule, r_max))
  return Adapter(modules=modules, ranks=ranks, scales=scales, scale_rule=scale_rule, alpha=alpha,
                 r_max=r_max, model_kind="llama_lm", model_name=str(model_path))


def lora_tree(adapter):
  """The folded tree the model consumes: ``a * mask(r_m) * s_m`` per module, nested like the params."""
  from flax import traverse_util
  from hetlora import lora as lora_lib
  flat = {}
  for path, mod in adapter.modules.items():
    v = np.asarray(lora_lib.rank_mask(adapter.ranks[path], adapter.r_max)) * adapter.scales[path]
    flat[f"{path}/a"], flat[f"{path}/b"] = mod["a"] * v.astype(np.float32), mod["b"]
  return traverse_util.unflatten_dict(flat, sep="/")


def controls(adapter, cfg):
  """The adapter as two broken exporters would write it (no Q/K permutation; no scale fold)."""
  import dataclasses
  from hetlora.models import gguf_loading
  unpermuted = {}
  for path, mod in adapter.modules.items():
    heads = {"attn/q_proj": cfg.n_heads, "attn/k_proj": cfg.n_kv_heads}.get(path.split("/", 1)[1])
    b = gguf_loading.unpermute_qk(mod["b"].T, heads).T if heads else mod["b"]
    unpermuted[path] = {"a": mod["a"], "b": np.ascontiguousarray(b)}     # export re-permutes: HF order lands
  raw_scales = {p: adapter.alpha / r for p, r in adapter.ranks.items()}  # c_m = 1: factors as trained
  return {"no_qk_permute": dataclasses.replace(adapter, modules=unpermuted),
          "no_scale_fold": dataclasses.replace(adapter, scales=raw_scales)}


def cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def compare(ours_base, ours_adapted, cpp_base, cpp_adapted) -> dict:
  """Differences over all prompts (lists of ``[L, V]`` arrays); see the module docstring."""
  cat = lambda xs: np.concatenate([np.asarray(x, np.float64) for x in xs])
  ob, oa, cb, ca = map(cat, (ours_base, ours_adapted, cpp_base, cpp_adapted))
  effect_ours, gap = oa - ob, np.abs((oa - ob) - (ca - cb))
  return {"raw": float(np.abs(oa - ca).max()),
          "effect_diff": float(gap.max()),
          "effect_diff_mean": float(gap.mean()),
          "effect_rel": float(np.linalg.norm(gap) / np.linalg.norm(effect_ours)),
          "effect": float(np.abs(effect_ours).max()),
          "top1": float(np.mean(oa.argmax(-1) == ca.argmax(-1)))}


def write_f32_copy(src: Path, dst: Path) -> Path:
  """``src`` (any GGUF our loader reads) with every tensor dequantised to float32, metadata kept."""
  import gguf
  reader = gguf.GGUFReader(src)
  writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
  for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
      continue
    value = int(gguf.LlamaFileType.ALL_F32) if name == "general.file_type" else field.contents()
    writer.add_key_value(name, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
  for t in reader.tensors:
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    writer.add_tensor(t.name, w.reshape([int(d) for d in reversed(t.shape)]))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dst


def checks_of(rows: list[dict]) -> dict[str, bool]:
  """The pass/fail checks of the table (tolerances above)."""
  row = {(r["base"], r["case"]): r for r in rows}
  f32, q4 = row[("f32", "adapted")], row[("q4_1", "adapted")]
  controls = [row[("f32", c)] for c in ("no_qk_permute", "no_scale_fold")]
  return {
      f"f32: base and adapted raw <= {F32_TOL}": max(row[("f32", "base")]["raw"], f32["raw"]) <= F32_TOL,
      f"f32: effect_diff <= {F32_TOL}": f32["effect_diff"] <= F32_TOL,
      "f32: effect >= 1000 x effect_diff": f32["effect"] >= 1000 * f32["effect_diff"],
      f"f32: both controls exceed 100 x {F32_TOL}": all(c["effect_diff"] > 100 * F32_TOL for c in controls),
      f"q4_1: base and adapted raw <= {Q4_1_RAW_TOL}":
          max(row[("q4_1", "base")]["raw"], q4["raw"]) <= Q4_1_RAW_TOL,
      f"q4_1: effect_diff_mean <= {Q4_1_EFFECT_MEAN_TOL}": q4["effect_diff_mean"] <= Q4_1_EFFECT_MEAN_TOL,
      f"q4_1: top1 >= {Q4_1_TOP1_MIN}": q4["top1"] >= Q4_1_TOP1_MIN,
  }


def main(args) -> int:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import common  # noqa: F401  (puts the checkout on sys.path, imports jax)
  import jax
  import jax.numpy as jnp
  from hetlora.export import gguf as gguf_export
  from hetlora.models import files, gguf_loading, gguf_tokenizer, llama

  model_path = files.resolve(MODEL)
  reader = gguf_loading.open_gguf(model_path)
  cfg, params = gguf_loading.load_gguf(model_path, reader=reader)
  tok = gguf_tokenizer.tokenizer_from_gguf(model_path, reader=reader)
  ids = {f"p{k}": np.asarray(tok.encode(gguf_tokenizer.chat_prompt([{"role": "user", "content": p}]),
                                        add_special_tokens=False).ids, np.int32)
         for k, p in enumerate(PROMPTS)}
  adapter = random_adapter(cfg, model_path, args.r_max, args.alpha, args.scale_rule, args.b_std, args.seed)

  model = llama.Llama(cfg)
  apply = jax.jit(lambda p, l, x: model.apply(llama.variables(p, l), x))
  tree = jax.tree.map(jnp.asarray, lora_tree(adapter))
  ours = {"base": [np.asarray(apply(params, None, x[None])[0]) for x in ids.values()],
          "adapted": [np.asarray(apply(params, tree, x[None])[0]) for x in ids.values()]}

  cases = ("adapted", "no_qk_permute", "no_scale_fold")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    np.savez(tmp / "ids.npz", **ids)
    files_of = {tag: str(gguf_export.export(a, tmp / tag)[0])
                for tag, a in {"adapted": adapter, **controls(adapter, cfg)}.items()}
    bases = {"f32": (str(write_f32_copy(model_path, tmp / "base_f32.gguf")), "f32"),
             "q4_1": (str(model_path), "default")}
    runs = [[f"{b}/{tag}", path, files_of.get(tag, ""), kv]
            for b, (path, kv) in bases.items() for tag in ("base", *cases)]
    (tmp / "runs.json").write_text(json.dumps(runs))
    t0 = time.perf_counter()
    cmd = [args.python, str(Path(__file__).resolve()), "--worker", "--ids", str(tmp / "ids.npz"),
           "--runs", str(tmp / "runs.json"), "--out", str(tmp / "cpp.npz"), "--n-ctx", str(args.n_ctx),
           "--threads", str(args.threads)]
    subprocess.run(cmd, check=True)
    cpp_seconds = time.perf_counter() - t0
    cpp = dict(np.load(tmp / "cpp.npz"))
    file_bytes = Path(files_of["adapted"]).stat().st_size

  keys = list(ids)
  cpp_of = lambda tag: [cpp[f"{tag}/{k}"] for k in keys]
  rows = []
  for b in bases:
    gap = [(o, c) for o, c in zip(ours["base"], cpp_of(f"{b}/base"))]
    rows.append({"base": b, "case": "base", "raw": float(max(np.abs(o - c).max() for o, c in gap)),
                 "top1": float(np.mean(np.concatenate([o.argmax(-1) == c.argmax(-1) for o, c in gap])))})
    rows += [{"base": b, "case": tag,
              **compare(ours["base"], ours["adapted"], cpp_of(f"{b}/base"), cpp_of(f"{b}/{tag}"))}
             for tag in cases]
  checks = checks_of(rows)
  ranks = np.array(list(adapter.ranks.values()))
  setup = {"model": model_path.name, "prompts": len(PROMPTS), "tokens": int(sum(len(x) for x in ids.values())),
           "modules": len(adapter.modules), "r_max": args.r_max, "ranks_min_max_mean":
           [int(ranks.min()), int(ranks.max()), round(float(ranks.mean()), 2)], "alpha": args.alpha,
           "scale_rule": args.scale_rule, "b_std": args.b_std, "seed": args.seed,
           "adapter_file_bytes": file_bytes, "llama_cpp_seconds": round(cpp_seconds, 1),
           "llama_cpp_kv_cache": {"f32": "f32", "q4_1": "default (f16)"}}
  versions = {"cpu": cpu_name(), "llama_cpp_python": str(cpp["llama_cpp_version"]), "gguf": _version("gguf")}
  notes = (f"Random heterogeneous-rank adapter on {setup['modules']} modules of {setup['model']} "
           f"(ranks min/max/mean {setup['ranks_min_max_mean']} of r_max={args.r_max}, "
           f"scale_rule={args.scale_rule}, alpha={args.alpha}, b_std={args.b_std}), {setup['tokens']} tokens "
           f"over {len(PROMPTS)} ChatML prompts; |logit| differences, ours vs llama.cpp. Bases: `f32` = the "
           "Q4_1 weights dequantised to a float32 GGUF (f32 KV cache), `q4_1` = the shipped file with "
           f"llama.cpp's defaults. CPU: {versions['cpu']}; llama-cpp-python {versions['llama_cpp_python']}, "
           f"gguf {versions['gguf']}.\n\nChecks: " +
           "; ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
  table = common.markdown_table(rows, ["base", "case", "raw", "effect_diff", "effect_diff_mean",
                                       "effect_rel", "effect", "top1"])
  common.write("llamacpp_roundtrip", {
      "setup": setup, "versions": versions, "rows": rows, "checks": checks,
      "tolerances": {"f32_raw_and_effect_diff": F32_TOL, "q4_1_raw": Q4_1_RAW_TOL,
                     "q4_1_effect_diff_mean": Q4_1_EFFECT_MEAN_TOL, "q4_1_top1_min": Q4_1_TOP1_MIN}},
      table, notes)
  print(notes)
  return 0 if all(checks.values()) else 1


def _version(package: str) -> str:
  from importlib import metadata
  return metadata.version(package)


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--python", default=os.environ.get("LLAMACPP_PYTHON", "python3"),
                 help="interpreter with llama-cpp-python (benchmarks/requirements-llamacpp.txt; "
                      "or $LLAMACPP_PYTHON)")
  p.add_argument("--r-max", type=int, default=8)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--scale-rule", default="alpha/r_max", choices=("alpha/r", "alpha/r_max", "rslora"))
  p.add_argument("--b-std", type=float, default=0.03, help="std of the b factors (the effect's size)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--n-ctx", type=int, default=256)
  p.add_argument("--threads", type=int, default=2)
  # worker mode (internal: run by --python)
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--ids", help=argparse.SUPPRESS)
  p.add_argument("--runs", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  return p.parse_args(argv)


if __name__ == "__main__":
  ARGS = parse()
  if ARGS.worker:
    worker(ARGS)
  else:
    sys.exit(main(ARGS))
