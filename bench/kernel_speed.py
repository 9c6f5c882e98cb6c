"""Kernel microbenchmarks: W4Ax GEMM, fused activation quantization, KV4 decode attention.

    python bench/kernel_speed.py                 # GPU: full shape sweep, compiled Pallas kernels
    python bench/kernel_speed.py --smoke         # tiny shapes, interpret mode on CPU, a few seconds
    python bench/kernel_speed.py --kernels w4ax_matmul w4ax_matmul_sm90 --skip-attention   # the two GEMMs

Every op is timed against baselines in the same run:
  w4ax_matmul   vs xla_bf16 (jnp.dot bf16) and xla_int8 (int8 x int8 -> int32 jnp.dot)
  w4ax_matmul_sm90 (Mosaic GPU, Hopper only; interpreter in --smoke) vs the same two, and vs
                pallas_triton (the w4ax_matmul time of the same row) when both run; --sm90-variants adds
                w4ax_matmul_sm90_grid (plain grid instead of the persistent schedule), _ws and _grid_ws
                (warp-specialized pipeline) rows with the same baselines
  quantize_act  vs xla_reference (the jnp twin, XLA-fused)
  kv4_attention vs jax_dpa (jax.nn.dot_product_attention over a bf16 cache)
  kv4_attention_paged (one layer of a paged KV4 cache: channel-mode K in 32-token pages, scattered page table)
                vs the same
GEMM shapes are one layer of Llama-2-7B, Llama-3-8B and Llama-3-70B (qkv, o, fused gate_up, down) at
M in {1, 4, 16, 64, 256, 1024, 4096} and INT8-block fractions {0, 0.25, 1}; attention uses Llama-3-8B
heads (32 q, 8 kv, head_dim 128) at context {1k, 8k, 32k} and batch {1, 8, 32}.

Timing: warm-up calls, then the median (and 10th/90th percentiles) of many calls, each on the next of
several input copies (rotating inputs so small operands are not served from L2), with
block_until_ready. Results: a table (printed last), JSON `bench/results/kernels_<device>.json` and a
PNG plot of speedup vs M (skipped with a message when matplotlib is missing). CPU numbers from
--smoke only show that the script runs: they go to a temp dir, marked "smoke": true, not results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from bench.common import device_tag, run_metadata  # noqa: E402
from cometjax.serving.kvcache import KV4Cache  # noqa: E402
from cometjax.core.kv_config import KVQuantConfig  # noqa: E402
from cometjax.pallas.kv4_attention import kv4_decode_attention  # noqa: E402
from cometjax.pallas.paged_kv4_attention import paged_kv4_attention  # noqa: E402
from cometjax.pallas.quantize_act import quantize_act, quantize_act_reference  # noqa: E402
from cometjax.pallas import w4ax_matmul_sm90 as sm90  # noqa: E402
from cometjax.pallas.w4ax_matmul import w4ax_matmul  # noqa: E402
from cometjax.core.formats import ActivationFormat, QuantizedWeight  # noqa: E402
from cometjax.core.kv import PagedKV4, QuantizedKV  # noqa: E402
from cometjax.ops import registry  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelShapes:
  name: str
  hidden: int
  intermediate: int
  q_heads: int
  kv_heads: int
  head_dim: int

  def gemms(self) -> dict[str, tuple[int, int]]:  # layer -> (K, N)
    qkv = (self.q_heads + 2 * self.kv_heads) * self.head_dim
    return {"qkv": (self.hidden, qkv), "o": (self.q_heads * self.head_dim, self.hidden),
            "gate_up": (self.hidden, 2 * self.intermediate), "down": (self.intermediate, self.hidden)}


FULL_MODELS = (
    ModelShapes("llama2-7b", 4096, 11008, 32, 32, 128),
    ModelShapes("llama3-8b", 4096, 14336, 32, 8, 128),
    ModelShapes("llama3-70b", 8192, 28672, 64, 8, 128),
)
SMOKE_MODELS = (ModelShapes("tiny", 128, 256, 8, 2, 16),)  # K=128 layers: the sm90 kernel needs 64-channel blocks
KERNELS = ("w4ax_matmul", "w4ax_matmul_sm90", "quantize_act", "kv4_attention", "kv4_attention_paged")
SM90_VARIANTS = {  # op name -> w4ax_matmul_sm90 tuning
    "w4ax_matmul_sm90": dict(schedule="persistent", warp_specialized=False),
    "w4ax_matmul_sm90_grid": dict(schedule="grid", warp_specialized=False),
    "w4ax_matmul_sm90_ws": dict(schedule="persistent", warp_specialized=True),
    "w4ax_matmul_sm90_grid_ws": dict(schedule="grid", warp_specialized=True),
}


@dataclasses.dataclass(frozen=True)
class Sweep:
  models: tuple[ModelShapes, ...]
  layers: tuple[str, ...]
  ms: tuple[int, ...]
  int8_fractions: tuple[float, ...]
  block_size: int
  attention_model: ModelShapes
  contexts: tuple[int, ...]
  batches: tuple[int, ...]
  warmup: int
  iterations: int


FULL = Sweep(FULL_MODELS, ("qkv", "o", "gate_up", "down"), (1, 4, 16, 64, 256, 1024, 4096), (0.0, 0.25, 1.0),
             128, FULL_MODELS[1], (1024, 8192, 32768), (1, 8, 32), warmup=3, iterations=30)
SMOKE = Sweep(SMOKE_MODELS, ("o",), (4,), (0.5,), 64, ModelShapes("tiny", 64, 128, 4, 2, 32), (64,), (2,),
              warmup=1, iterations=2)


def time_ms(fn, arg_sets, warmup: int, iterations: int) -> dict:
  """Median and spread (ms) of fn over rotating argument sets, after warm-up."""
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  samples = []
  for i in range(iterations):
    args = arg_sets[i % len(arg_sets)]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - start) * 1e3)
  samples.sort()
  return {"ms": statistics.median(samples), "p10_ms": samples[int(0.1 * (len(samples) - 1))],
          "p90_ms": samples[int(0.9 * (len(samples) - 1))]}


def rotations(nbytes: int) -> int:
  """Input copies to cycle through so an operand set is not L2-resident (H100 L2 = 50 MB)."""
  return max(2, min(4, math.ceil(128 * 2**20 / max(nbytes, 1))))


def random_quantized_weight(key, k: int, n: int, fmt: ActivationFormat) -> QuantizedWeight:
  data_key, scale_key = jax.random.split(key)
  data = jax.random.bits(data_key, (k // 2, n), jnp.uint8)
  scales = jax.random.uniform(scale_key, (1, n), jnp.float32, 1e-3, 2e-3)
  return QuantizedWeight(data=data, scales=scales, perm=jax.random.permutation(key, k).astype(jnp.int32),
                         bits=4, group_size=None, shape=(k, n), activation=fmt)


def bench_gemms(sweep: Sweep, interpret: bool, log, kernels=KERNELS, sm90_variants: bool = False) -> list[dict]:
  rows = []
  key = jax.random.key(0)
  run_sm90 = "w4ax_matmul_sm90" in kernels and (interpret or registry.is_hopper())
  if "w4ax_matmul_sm90" in kernels and not run_sm90:
    print("w4ax_matmul_sm90 skipped: needs a Hopper GPU (compute capability 9.x)")
  sm90_ops = {op: tuning for op, tuning in SM90_VARIANTS.items()
              if op == "w4ax_matmul_sm90" or (sm90_variants and not interpret)}  # the interpreter: default only
  for model in sweep.models:
    for layer in sweep.layers:
      k, n = model.gemms()[layer]
      shape = f"{model.name}.{layer} K={k} N={n}"
      copies = rotations(k * n // 2)
      weights_bf16 = [jax.random.normal(jax.random.fold_in(key, c), (k, n), jnp.bfloat16) for c in range(copies)]
      weights_int8 = [jax.random.randint(jax.random.fold_in(key, 10 + c), (k, n), -127, 128, jnp.int8)
                      for c in range(copies)]
      for m in sweep.ms:
        xs = [jax.random.normal(jax.random.fold_in(key, 100 + c), (m, k), jnp.bfloat16) for c in range(copies)]
        xs_int8 = [x.astype(jnp.int8) for x in xs]
        bf16 = time_ms(jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)),
                       list(zip(xs, weights_bf16)), sweep.warmup, sweep.iterations)
        int8 = time_ms(jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.int32)),
                       list(zip(xs_int8, weights_int8)), sweep.warmup, sweep.iterations)
        for fraction in sweep.int8_fractions:
          fmt = ActivationFormat.for_features(k, sweep.block_size, fraction)
          qws = [random_quantized_weight(jax.random.fold_in(key, 200 + c), k, n, fmt) for c in range(copies)]
          qxs = [quantize_act_reference(x, qw.perm, fmt) for x, qw in zip(xs, qws)]
          common = dict(shape=shape, m=m, k=k, n=n, int8_fraction=fraction, block_size=sweep.block_size)
          timings = {}  # op -> timing of this row
          if "w4ax_matmul" in kernels:
            matmul = jax.jit(lambda qx, qw: w4ax_matmul(qx, qw, out_dtype=jnp.bfloat16, interpret=interpret))
            timings["w4ax_matmul"] = time_ms(matmul, list(zip(qxs, qws)), sweep.warmup, sweep.iterations)
          for op, tuning in sm90_ops.items() if run_sm90 and sm90.shape_supported(qws[0]) else ():
            matmul_sm90 = jax.jit(lambda qx, qw, tuning=tuning: sm90.w4ax_matmul_sm90(
                qx, qw, out_dtype=jnp.bfloat16, interpret=interpret, **tuning))
            try:
              timings[op] = time_ms(matmul_sm90, list(zip(qxs, qws)), sweep.warmup, sweep.iterations)
            except Exception as error:  # noqa: BLE001 - an unverified kernel: report, keep the other rows
              if interpret:
                raise
              print(f"{op} failed at {shape} M={m} int8={fraction}: {error!r}")
          for op, timing in timings.items():
            baselines = [("xla_bf16", bf16), ("xla_int8", int8)]
            if op.startswith("w4ax_matmul_sm90") and "w4ax_matmul" in timings:
              baselines.append(("pallas_triton", timings["w4ax_matmul"]))
            for baseline, base in baselines:
              rows.append(dict(op=op, **common, **timing, baseline=baseline, baseline_ms=base["ms"],
                               speedup=base["ms"] / timing["ms"]))
          if "quantize_act" in kernels:
            fused = jax.jit(lambda x, perm, fmt=fmt: quantize_act(x, perm, fmt=fmt, interpret=interpret))
            reference = jax.jit(lambda x, perm, fmt=fmt: quantize_act_reference(x, perm, fmt))
            perm_sets = [(x, qw.perm) for x, qw in zip(xs, qws)]
            quant = time_ms(fused, perm_sets, sweep.warmup, sweep.iterations)
            quant_reference = time_ms(reference, perm_sets, sweep.warmup, sweep.iterations)
            timings["quantize_act"] = quant
            rows.append(dict(op="quantize_act", **common, **quant, baseline="xla_reference",
                             baseline_ms=quant_reference["ms"], speedup=quant_reference["ms"] / quant["ms"]))
          log(f"{shape} M={m} int8={fraction}: " + ", ".join(f"{op} {t['ms']:.4f} ms" for op, t in timings.items())
              + f", bf16 {bf16['ms']:.4f} ms, int8 {int8['ms']:.4f} ms")
  return rows


def random_paged_cache(key, batch: int, context: int, kv_heads: int, head_dim: int) -> PagedKV4:
  """One full layer of a paged INT4 cache (default channel mode, 32-token pages) over a shuffled page pool."""
  cache = KV4Cache.create(1, batch, context, kv_heads, head_dim, dtype=jnp.bfloat16,
                          config=KVQuantConfig()).paged_layer(0)
  code_key, recent_key, table_key = jax.random.split(key, 3)
  codes = jax.random.bits(code_key, (2, *cache.k.shape), jnp.uint8)
  table = jax.random.permutation(table_key, cache.num_pages).astype(jnp.int32).reshape(cache.page_table.shape)
  return dataclasses.replace(
      cache, k=codes[0], v=codes[1], k_scale=jnp.full_like(cache.k_scale, 0.05),
      k_zero=jnp.full_like(cache.k_zero, 8.0), v_scale=jnp.full_like(cache.v_scale, 0.05),
      v_zero=jnp.full_like(cache.v_zero, 8.0),
      k_recent=jax.random.normal(recent_key, cache.k_recent.shape, jnp.float32),
      length=jnp.full_like(cache.length, context), page_table=table)


def bench_attention(sweep: Sweep, interpret: bool, log, kernels=KERNELS) -> list[dict]:
  rows = []
  model = sweep.attention_model
  hq, hkv, d = model.q_heads, model.kv_heads, model.head_dim
  key = jax.random.key(1)
  for context in sweep.contexts:
    for batch in sweep.batches:
      shape = f"decode B={batch} S={context} Hq={hq} Hkv={hkv} D={d}"
      cache_bytes = batch * context * hkv * d  # INT4 K and V
      copies = 2 if cache_bytes > 2**28 else rotations(cache_bytes)
      lengths = jnp.full((batch,), context, jnp.int32)
      qs = [jax.random.normal(jax.random.fold_in(key, c), (batch, hq, d), jnp.bfloat16) for c in range(copies)]
      caches = []
      for c in range(copies):
        bytes_key = jax.random.fold_in(key, 100 + c)
        codes = jax.random.bits(bytes_key, (2, batch, context, hkv, d // 2), jnp.uint8)
        scale = jnp.full((batch, context, hkv, 1), 0.05, jnp.float32)
        zero = jnp.full((batch, context, hkv, 1), 8.0, jnp.float32)
        caches.append(QuantizedKV(k=codes[0], v=codes[1], k_scale=scale, k_zero=zero, v_scale=scale, v_zero=zero))
      timings = {}  # op -> timing of this row
      if "kv4_attention" in kernels:
        timings["kv4_attention"] = time_ms(
            jax.jit(lambda q, kv, lengths: kv4_decode_attention(q, kv, lengths, interpret=interpret)),
            [(q, kv, lengths) for q, kv in zip(qs, caches)], sweep.warmup, sweep.iterations)
      del caches
      if "kv4_attention_paged" in kernels:
        paged = [random_paged_cache(jax.random.fold_in(key, 400 + c), batch, context, hkv, d) for c in range(copies)]
        timings["kv4_attention_paged"] = time_ms(
            jax.jit(lambda q, cache: paged_kv4_attention(q, cache, interpret=interpret)),
            list(zip(qs, paged)), sweep.warmup, sweep.iterations)
        del paged
      bf16_caches = [(jax.random.normal(jax.random.fold_in(key, 200 + c), (batch, context, hkv, d), jnp.bfloat16),
                      jax.random.normal(jax.random.fold_in(key, 300 + c), (batch, context, hkv, d), jnp.bfloat16))
                     for c in range(min(copies, 2))]
      baselines = {}
      dpa = jax.jit(lambda q, k, v, lengths: jax.nn.dot_product_attention(
          q[:, None], k, v, key_value_seq_lengths=lengths)[:, 0])
      baselines["jax_dpa"] = time_ms(dpa, [(q, k, v, lengths) for q, (k, v) in zip(qs, bf16_caches)],
                                     sweep.warmup, sweep.iterations)
      for op, kv4 in timings.items():
        for baseline, timing in baselines.items():
          rows.append(dict(op=op, shape=shape, m=batch, context=context, int8_fraction=None, **kv4,
                           baseline=baseline, baseline_ms=timing["ms"], speedup=timing["ms"] / kv4["ms"]))
      log(f"{shape}: " + ", ".join(f"{b} {t['ms']:.4f} ms" for b, t in {**timings, **baselines}.items()))
  return rows


def format_table(rows: list[dict]) -> str:
  header = (f"{'op':<24} {'shape':<38} {'m':>5} {'int8':>5} {'ms':>10} {'baseline':<19} {'base ms':>10} "
            f"{'speedup':>8}")
  lines = [header, "-" * len(header)]
  for row in rows:
    fraction = "-" if row["int8_fraction"] is None else f"{row['int8_fraction']:.2f}"
    lines.append(f"{row['op']:<24} {row['shape']:<38} {row['m']:>5} {fraction:>5} {row['ms']:>10.4f} "
                 f"{row['baseline']:<19} {row['baseline_ms']:>10.4f} {row['speedup']:>8.2f}")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> str:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "matplotlib not installed: skipped the plot (pip install matplotlib)"
  gemm_rows = [r for r in rows if r["op"].startswith("w4ax_matmul") and r["baseline"] == "xla_bf16"]
  shapes = sorted({r["shape"] for r in gemm_rows})
  if not shapes:
    return "no GEMM rows: skipped the plot"
  columns = min(4, len(shapes))
  figure, axes = plt.subplots(math.ceil(len(shapes) / columns), columns, squeeze=False,
                              figsize=(4 * columns, 3 * math.ceil(len(shapes) / columns)))
  for axis, shape in zip(axes.flat, shapes):
    for op, fraction in sorted({(r["op"], r["int8_fraction"]) for r in gemm_rows}):
      points = sorted((r["m"], r["speedup"]) for r in gemm_rows
                      if r["shape"] == shape and r["int8_fraction"] == fraction and r["op"] == op)
      if points:
        axis.plot(*zip(*points), marker="o" if op == "w4ax_matmul" else "s",
                  label=f"{op.replace('w4ax_matmul', 'w4ax')} int8 {fraction:.2f}")
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_title(shape, fontsize=8)
    axis.set_xlabel("M")
    axis.set_ylabel("speedup vs XLA bf16")
  axes.flat[0].legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  return f"wrote {path}"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, a few seconds")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="JSON path (default bench/results/kernels_<device>.json; --smoke: a temp dir)")
  parser.add_argument("--skip-gemm", action="store_true")
  parser.add_argument("--skip-attention", action="store_true")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of " + ",".join(m.name for m in FULL_MODELS))
  parser.add_argument("--layers", default=None, help="comma-separated subset of qkv,o,gate_up,down")
  parser.add_argument("--ms", default=None, help="comma-separated M values (default the full sweep)")
  parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS),
                      help="ops to time (default all); e.g. --kernels w4ax_matmul w4ax_matmul_sm90")
  parser.add_argument("--sm90-variants", action="store_true",
                      help="also time the sm90 GEMM's grid schedule and warp-specialized pipeline (GPU only)")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)

  on_gpu = jax.default_backend() == "gpu"
  if not args.smoke and not on_gpu:
    parser.error("the full sweep needs a GPU (compiled Pallas Triton kernels); use --smoke on CPU")
  sweep = SMOKE if args.smoke else FULL
  if args.models:
    wanted = args.models.split(",")
    sweep = dataclasses.replace(sweep, models=tuple(m for m in FULL_MODELS if m.name in wanted))
  if args.layers:
    sweep = dataclasses.replace(sweep, layers=tuple(args.layers.split(",")))
  if args.ms:
    sweep = dataclasses.replace(sweep, ms=tuple(int(m) for m in args.ms.split(",")))
  interpret = not on_gpu
  log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))

  kernels = tuple(args.kernels)
  rows = []
  if not args.skip_gemm and set(kernels) & {"w4ax_matmul", "w4ax_matmul_sm90", "quantize_act"}:
    rows += bench_gemms(sweep, interpret, log, kernels, args.sm90_variants)
  if not args.skip_attention and {"kv4_attention", "kv4_attention_paged"} & set(kernels):
    rows += bench_attention(sweep, interpret, log, kernels)

  tag = device_tag()
  if args.out:
    out = args.out
  elif args.smoke:  # smoke timings are not results: keep them out of bench/results
    out = pathlib.Path(tempfile.gettempdir()) / "cometjax_bench" / f"kernels_{tag}_smoke.json"
  else:
    out = ROOT / "bench" / "results" / f"kernels_{tag}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  report = {
      **run_metadata(), "device_tag": tag, "backend": jax.default_backend(), "smoke": args.smoke, "interpret": interpret,
      "timing": f"median of {sweep.iterations} calls after {sweep.warmup} warm-up, rotating inputs",
      "kernels": list(kernels), "rows": rows,
  }
  out.write_text(json.dumps(report, indent=1))
  print(plot(rows, out.with_suffix(".png")))
  print(f"wrote {out}")
  print(format_table(rows))
  return report


if __name__ == "__main__":
  main()
