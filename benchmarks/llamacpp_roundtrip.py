"""llama.cpp applies our GGUF LoRA adapter as our JAX model does (SmolLM2-135M-Instruct; an untied head).

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
Results: ``benchmarks/results/llamacpp_roundtrip.{json,md}``.

SmolLM2 ties its LM head to the token embedding, so the case ``untied``
(``--model untied``) checks the export of a LoRA on an untied ``lm_head``,
which our export writes on the GGUF ``output.weight`` and llama.cpp adapts in
``build_lora_mm(model.output, ...)``. Its base is a small random Llama
(:data:`UNTIED_SHAPE`: 2 layers, d_model 64, 4 query / 2 key-value heads,
ffn 128) with SmolLM2's tokenizer and metadata and its own
``output.weight: [vocab, d_model]``, written as a float32 GGUF by the same
writer as the ``f32`` base (float32 KV cache); our side loads that file with
:func:`hetlora.models.gguf_loading.load_gguf` (untied: ``lm_head/kernel``).
The random adapter (``--untied-b-std``) covers every projection and
``lm_head``. Rows, same metrics and ``f32`` tolerance: ``base``, ``adapted``,
``head_only`` (only the ``lm_head`` module, compared with ours under that
adapter: the head's LoRA alone must match), and three controls compared with
ours under the full adapter, each of which must fail: ``no_head`` (the file
without ``output.weight``'s LoRA: what llama.cpp would give if it ignored
it), ``no_qk_permute``, ``no_scale_fold``. Results:
``benchmarks/results/llamacpp_roundtrip_untied.{json,md}``. (A tied base has
no ``output.weight``: llama.cpp rejects a whole adapter that names it, so
:mod:`hetlora.export.gguf` refuses an ``lm_head`` module there.)

Set up llama-cpp-python once (~15-40 CPU-minutes to build)::

    python3 -m venv ../llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 ../llamacpp-venv/bin/pip install -r benchmarks/requirements-llamacpp.txt

Run both cases (~5-6 minutes on 2 cores; exits 1 when a check fails), or one with
``--model smollm2`` (~3 minutes) / ``--model untied`` (~1.5 minutes)::

    python benchmarks/llamacpp_roundtrip.py [--python ../llamacpp-venv/bin/python] [--model all|smollm2|untied]
"""

from __future__ import annotations

import argparse
import json
import os
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
# The untied-head case: a small random Llama whose lm_head (GGUF output.weight) is its own matrix.
UNTIED_SHAPE = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "ffn": 128}


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

def random_adapter(cfg, model_path, r_max, alpha, scale_rule, b_std, seed, head=False):
  """A random ``Adapter`` on all 7 projections of every layer (and the untied ``lm_head`` if ``head``),
  ranks in ``1..r_max``."""
  from hetlora import lora as lora_lib
  from hetlora.export import Adapter
  rng = np.random.default_rng(seed)
  q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  shapes = {"attn/q_proj": (cfg.d_model, q), "attn/k_proj": (cfg.d_model, kv),
            "attn/v_proj": (cfg.d_model, kv), "attn/o_proj": (q, cfg.d_model),
            "mlp/gate_proj": (cfg.d_model, cfg.ffn), "mlp/up_proj": (cfg.d_model, cfg.ffn),
            "mlp/down_proj": (cfg.ffn, cfg.d_model)}
  shapes = {f"layers_{i}/{name}": s for i in range(cfg.n_layers) for name, s in shapes.items()}
  if head:
    shapes["lm_head"] = (cfg.d_model, cfg.vocab_size)
  modules, ranks, scales = {}, {}, {}
  for path, (d_in, d_out) in shapes.items():
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
    heads = {"attn/q_proj": cfg.n_heads, "attn/k_proj": cfg.n_kv_heads}.get(path.split("/", 1)[-1])
    b = gguf_loading.unpermute_qk(mod["b"].T, heads).T if heads else mod["b"]
    unpermuted[path] = {"a": mod["a"], "b": np.ascontiguousarray(b)}     # export re-permutes: HF order lands
  raw_scales = {p: adapter.alpha / r for p, r in adapter.ranks.items()}  # c_m = 1: factors as trained
  return {"no_qk_permute": dataclasses.replace(adapter, modules=unpermuted),
          "no_scale_fold": dataclasses.replace(adapter, scales=raw_scales)}


def cpu_name() -> str:
  from hetlora import compare as compare_lib
  return compare_lib.cpu_model() or "unknown"


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


def write_f32_gguf(src: Path, dst: Path, tensors: dict | None = None, meta: dict | None = None) -> Path:
  """A float32 GGUF at ``dst`` with ``src``'s metadata (tokenizer included).

  Args:
    src: any GGUF our loader reads.
    dst: the file to write.
    tensors: ``{gguf_name: array}`` in numpy order to write instead of ``src``'s tensors
      (default: ``src``'s, dequantised to float32).
    meta: values replacing those of existing ``src`` keys (their GGUF types are kept).
  """
  import gguf
  reader = gguf.GGUFReader(src)
  meta = dict(meta or {})
  unknown = set(meta) - set(reader.fields)
  if unknown:
    raise KeyError(f"write_f32_gguf: {sorted(unknown)} are not keys of {str(src)!r}.")
  writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
  for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
      continue
    value = int(gguf.LlamaFileType.ALL_F32) if name == "general.file_type" else meta.get(name, field.contents())
    writer.add_key_value(name, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
  if tensors is None:
    tensors = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
        [int(d) for d in reversed(t.shape)]) for t in reader.tensors}
  for name, w in tensors.items():
    writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dst


def untied_weights(vocab: int, shape: dict, seed: int) -> tuple[dict, dict]:
  """Random float32 weights and ``llama.*`` metadata of a small untied-head Llama (GGUF names).

  Matrices ``[out, in]`` are ``N(0, 1/in)``, the token embedding ``N(0, 1)``, norms ``1 + N(0, 0.1^2)``;
  ``output.weight: [vocab, d_model]`` is the untied head, independent of ``token_embd.weight``.
  """
  rng = np.random.default_rng(seed)
  d, ffn, hd = shape["d_model"], shape["ffn"], shape["d_model"] // shape["n_heads"]
  q, kv = shape["n_heads"] * hd, shape["n_kv_heads"] * hd
  mat = lambda d_out, d_in: rng.normal(size=(d_out, d_in)) / np.sqrt(d_in)
  norm = lambda: 1.0 + 0.1 * rng.normal(size=(d,))
  t = {"token_embd.weight": rng.normal(size=(vocab, d)), "output_norm.weight": norm(),
       "output.weight": mat(vocab, d)}
  for i in range(shape["n_layers"]):
    t.update({f"blk.{i}.attn_norm.weight": norm(), f"blk.{i}.attn_q.weight": mat(q, d),
              f"blk.{i}.attn_k.weight": mat(kv, d), f"blk.{i}.attn_v.weight": mat(kv, d),
              f"blk.{i}.attn_output.weight": mat(d, q), f"blk.{i}.ffn_norm.weight": norm(),
              f"blk.{i}.ffn_gate.weight": mat(ffn, d), f"blk.{i}.ffn_up.weight": mat(ffn, d),
              f"blk.{i}.ffn_down.weight": mat(d, ffn)})
  meta = {"general.name": "hetlora random untied-head llama", "llama.block_count": shape["n_layers"],
          "llama.embedding_length": d, "llama.feed_forward_length": ffn,
          "llama.attention.head_count": shape["n_heads"], "llama.attention.head_count_kv": shape["n_kv_heads"],
          "llama.rope.dimension_count": hd}
  return {k: v.astype(np.float32) for k, v in t.items()}, meta


def checks_of(rows: list[dict]) -> dict[str, bool]:
  """The pass/fail checks of the SmolLM2 table (tolerances above)."""
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


def untied_checks_of(rows: list[dict]) -> dict[str, bool]:
  """The pass/fail checks of the untied-head table (the ``f32`` tolerances)."""
  row = {r["case"]: r for r in rows}
  exact = [row[c] for c in ("adapted", "head_only")]
  controls = [row[c] for c in ("no_head", "no_qk_permute", "no_scale_fold")]
  return {
      f"untied f32: base, adapted and head_only raw <= {F32_TOL}":
          max(row["base"]["raw"], *(r["raw"] for r in exact)) <= F32_TOL,
      f"untied f32: adapted and head_only effect_diff <= {F32_TOL}":
          all(r["effect_diff"] <= F32_TOL for r in exact),
      "untied f32: adapted and head_only effect >= 1000 x effect_diff":
          all(r["effect"] >= 1000 * r["effect_diff"] for r in exact),
      f"untied f32: the three controls exceed 100 x {F32_TOL}":
          all(c["effect_diff"] > 100 * F32_TOL for c in controls),
  }


def tokens_of(model_path, reader=None) -> dict[str, np.ndarray]:
  """The ChatML token ids of :data:`PROMPTS` with the tokenizer of the GGUF ``model_path``."""
  from hetlora.models import gguf_tokenizer
  tok = gguf_tokenizer.tokenizer_from_gguf(model_path, reader=reader)
  return {f"p{k}": np.asarray(tok.encode(gguf_tokenizer.chat_prompt([{"role": "user", "content": p}]),
                                         add_special_tokens=False).ids, np.int32)
          for k, p in enumerate(PROMPTS)}


def ours_logits(cfg, params, trees: dict, ids: dict) -> dict[str, list[np.ndarray]]:
  """Our ``[L, V]`` logits of every prompt for each ``{tag: folded LoRA tree or None}``."""
  import jax
  import jax.numpy as jnp
  from hetlora.models import llama
  model = llama.Llama(cfg)
  apply = jax.jit(lambda p, l, x: model.apply(llama.variables(p, l), x))
  out = {}
  for tag, tree in trees.items():
    tree = None if tree is None else jax.tree.map(jnp.asarray, tree)
    out[tag] = [np.asarray(apply(params, tree, x[None])[0]) for x in ids.values()]
  return out


def llama_cpp_logits(args, tmp: Path, ids: dict, runs: list) -> tuple[dict, float]:
  """llama.cpp's logits of ``runs`` (``[[tag, model, lora or "", kv], ...]``) from the ``--python`` worker."""
  np.savez(tmp / "ids.npz", **ids)
  (tmp / "runs.json").write_text(json.dumps(runs))
  t0 = time.perf_counter()
  cmd = [args.python, str(Path(__file__).resolve()), "--worker", "--ids", str(tmp / "ids.npz"),
         "--runs", str(tmp / "runs.json"), "--out", str(tmp / "cpp.npz"), "--n-ctx", str(args.n_ctx),
         "--threads", str(args.threads)]
  subprocess.run(cmd, check=True)
  return dict(np.load(tmp / "cpp.npz")), time.perf_counter() - t0


def base_row(base: str, ours: list, cpp: list) -> dict:
  """The no-adapter row: max ``|ours - llama.cpp|`` and arg-max agreement."""
  return {"base": base, "case": "base", "raw": float(max(np.abs(o - c).max() for o, c in zip(ours, cpp))),
          "top1": float(np.mean(np.concatenate([o.argmax(-1) == c.argmax(-1) for o, c in zip(ours, cpp)])))}


def run_smollm2(args, common) -> bool:
  """The SmolLM2-135M-Instruct case (tied head); writes ``results/llamacpp_roundtrip.*``."""
  from hetlora.export import gguf as gguf_export
  from hetlora.models import files, gguf_loading

  model_path = files.resolve(MODEL)
  reader = gguf_loading.open_gguf(model_path)
  cfg, params = gguf_loading.load_gguf(model_path, reader=reader)
  ids = tokens_of(model_path, reader)
  adapter = random_adapter(cfg, model_path, args.r_max, args.alpha, args.scale_rule, args.b_std, args.seed)
  ours = ours_logits(cfg, params, {"base": None, "adapted": lora_tree(adapter)}, ids)

  cases = ("adapted", "no_qk_permute", "no_scale_fold")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    files_of = {tag: str(gguf_export.export(a, tmp / tag)[0])
                for tag, a in {"adapted": adapter, **controls(adapter, cfg)}.items()}
    bases = {"f32": (str(write_f32_gguf(model_path, tmp / "base_f32.gguf")), "f32"),
             "q4_1": (str(model_path), "default")}
    runs = [[f"{b}/{tag}", path, files_of.get(tag, ""), kv]
            for b, (path, kv) in bases.items() for tag in ("base", *cases)]
    cpp, cpp_seconds = llama_cpp_logits(args, tmp, ids, runs)
    file_bytes = Path(files_of["adapted"]).stat().st_size

  cpp_of = lambda tag: [cpp[f"{tag}/{k}"] for k in ids]
  rows = []
  for b in bases:
    rows.append(base_row(b, ours["base"], cpp_of(f"{b}/base")))
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
  return _report("llamacpp_roundtrip", setup, versions, rows, checks, notes,
                 {"f32_raw_and_effect_diff": F32_TOL, "q4_1_raw": Q4_1_RAW_TOL,
                  "q4_1_effect_diff_mean": Q4_1_EFFECT_MEAN_TOL, "q4_1_top1_min": Q4_1_TOP1_MIN})


def _report(name, setup, versions, rows, checks, notes, tolerances) -> bool:
  """Writes ``results/<name>.{json,md}`` (the rows as a table), prints the notes; True when every check passed."""
  import common   # on sys.path once main() has run
  table = common.markdown_table(rows, ["base", "case", "raw", "effect_diff", "effect_diff_mean",
                                       "effect_rel", "effect", "top1"])
  common.write(name, {"setup": setup, "versions": versions, "rows": rows, "checks": checks,
                      "tolerances": tolerances}, table, notes)
  print(notes)
  return all(checks.values())


def run_untied(args, common) -> bool:
  """The random untied-head Llama case (LoRA on ``lm_head`` too).

  Writes ``results/llamacpp_roundtrip_untied.*``.
  """
  import dataclasses
  import gguf
  from hetlora.export import gguf as gguf_export
  from hetlora.models import files, gguf_loading

  source = files.resolve(MODEL)             # tokenizer and metadata only
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    vocab = int(gguf_loading.open_gguf(source).fields["llama.vocab_size"].contents())
    weights, meta = untied_weights(vocab, UNTIED_SHAPE, args.seed)
    base_path = write_f32_gguf(source, tmp / "untied_f32.gguf", tensors=weights, meta=meta)
    reader = gguf_loading.open_gguf(base_path)
    cfg, params = gguf_loading.load_gguf(base_path, reader=reader)
    if cfg.tie_embeddings or "lm_head" not in params:
      raise RuntimeError(f"{base_path} loaded with a tied head; expected output.weight to be the lm_head.")
    ids = tokens_of(base_path, reader)
    adapter = random_adapter(cfg, base_path, args.r_max, args.alpha, args.scale_rule, args.untied_b_std,
                             args.seed, head=True)
    only = lambda keep: dataclasses.replace(
        adapter, **{f: {p: v for p, v in getattr(adapter, f).items() if keep(p)}
                    for f in ("modules", "ranks", "scales")})
    head_only, no_head = only(lambda p: p == "lm_head"), only(lambda p: p != "lm_head")
    ours = ours_logits(cfg, params, {"base": None, "adapted": lora_tree(adapter),
                                     "head_only": lora_tree(head_only)}, ids)
    # no_head: llama.cpp would match it if it dropped the output.weight LoRA; the others as for SmolLM2.
    written = {"adapted": adapter, "head_only": head_only, "no_head": no_head, **controls(adapter, cfg)}
    files_of = {tag: str(gguf_export.export(a, tmp / tag)[0]) for tag, a in written.items()}
    head_tensors = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(files_of["adapted"]).tensors
                    if t.name.startswith("output.weight")}
    runs = [[f"f32/{tag}", str(base_path), files_of.get(tag, ""), "f32"] for tag in ("base", *written)]
    cpp, cpp_seconds = llama_cpp_logits(args, tmp, ids, runs)
    file_bytes = Path(files_of["adapted"]).stat().st_size

  cpp_of = lambda tag: [cpp[f"f32/{tag}/{k}"] for k in ids]
  rows = [base_row("f32", ours["base"], cpp_of("base"))]
  reference = lambda tag: ours["head_only" if tag == "head_only" else "adapted"]
  rows += [{"base": "f32", "case": tag, **compare(ours["base"], reference(tag), cpp_of("base"), cpp_of(tag))}
           for tag in written]
  checks = untied_checks_of(rows)
  ranks = np.array(list(adapter.ranks.values()))
  setup = {"model": "random untied-head llama, SmolLM2 tokenizer", **UNTIED_SHAPE, "vocab": cfg.vocab_size,
           "head_dim": cfg.head_dim, "tie_embeddings": cfg.tie_embeddings, "prompts": len(PROMPTS),
           "tokens": int(sum(len(x) for x in ids.values())), "modules": len(adapter.modules),
           "lm_head_rank": adapter.ranks["lm_head"], "r_max": args.r_max,
           "ranks_min_max_mean": [int(ranks.min()), int(ranks.max()), round(float(ranks.mean()), 2)],
           "alpha": args.alpha, "scale_rule": args.scale_rule, "b_std": args.untied_b_std, "seed": args.seed,
           "head_lora_tensors_ggml_ne": head_tensors, "adapter_file_bytes": file_bytes,
           "llama_cpp_seconds": round(cpp_seconds, 1), "llama_cpp_kv_cache": "f32"}
  versions = {"cpu": cpu_name(), "llama_cpp_python": str(cpp["llama_cpp_version"]), "gguf": _version("gguf")}
  notes = (f"Random untied-head Llama ({UNTIED_SHAPE['n_layers']} layers, d_model {UNTIED_SHAPE['d_model']}, "
           f"{UNTIED_SHAPE['n_heads']}/{UNTIED_SHAPE['n_kv_heads']} heads, ffn {UNTIED_SHAPE['ffn']}, vocab "
           f"{cfg.vocab_size}; `output.weight` independent of `token_embd.weight`) written as a float32 GGUF "
           f"with SmolLM2's tokenizer (f32 KV cache). Random heterogeneous-rank adapter on {setup['modules']} "
           f"modules, lm_head included (rank {setup['lm_head_rank']}; file tensors {head_tensors}, ggml ne), "
           f"ranks min/max/mean {setup['ranks_min_max_mean']} of r_max={args.r_max}, "
           f"scale_rule={args.scale_rule}, alpha={args.alpha}, b_std={args.untied_b_std}; "
           f"{setup['tokens']} tokens over {len(PROMPTS)} ChatML "
           "prompts; |logit| differences, ours vs llama.cpp. `head_only`: the lm_head module alone (compared "
           "with ours under that adapter); controls, compared with ours under the full adapter: `no_head` "
           "(the file without output.weight's LoRA: what llama.cpp would compute if it ignored it), "
           f"`no_qk_permute`, `no_scale_fold`. CPU: {versions['cpu']}; llama-cpp-python "
           f"{versions['llama_cpp_python']}, gguf {versions['gguf']}.\n\nChecks: " +
           "; ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
  return _report("llamacpp_roundtrip_untied", setup, versions, rows, checks, notes,
                 {"f32_raw_and_effect_diff": F32_TOL})


def main(args) -> int:
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import common  # noqa: F401  (puts the checkout on sys.path, imports jax)
  names = ("smollm2", "untied") if args.model == "all" else (args.model,)
  ok = [{"smollm2": run_smollm2, "untied": run_untied}[n](args, common) for n in names]
  return 0 if all(ok) else 1


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
  p.add_argument("--model", default="all", choices=("all", "smollm2", "untied"),
                 help="smollm2: SmolLM2-135M-Instruct (tied head; f32 and q4_1 bases); untied: a small random "
                      "untied-head Llama with a LoRA on lm_head too (f32 base); all: both")
  p.add_argument("--untied-b-std", type=float, default=0.03, help="--b-std of the untied case")
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
