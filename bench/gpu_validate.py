"""One prepared validation run for a lent GPU: every compiled kernel against its reference, the key timings
against XLA baselines measured in the same run, and an end-to-end generate per preset, inside a budget of
about 8 minutes, with the JSON rewritten after every case.

    python bench/gpu_validate.py --out DIR              # GPU: DIR/gpu_validate_<device>.json
    python bench/gpu_validate.py --out DIR --dry-run    # CPU: interpret mode, tiny shapes (CI runs this)
    python bench/gpu_validate.py --table FILE           # the validated_kernels.json entry FILE supports

Sections run in order, each with a wall-clock cap (--caps, seconds): checks 150, timings 100, e2e 120 (a dry run
runs every case). A case
that would start after its section's cap is recorded as skipped, every case runs in try/except, so one failing
kernel never stops the run, and the probe that can crash the process (a page pool past 2**31 bytes) runs in a
child process, as does each end-to-end case. Checks compare against the jnp references: integer GEMMs exactly,
float ones by max |got - want| / max |want|; quantize_act by code (the compiled kernel may round a tie the other
way: at most one code apart on a small fraction of entries). Timings are medians over rotating inputs after
warm-up (`bench.common` style), with XLA bf16 and XLA int8 dots of the same shapes in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import device_tag, run_metadata, write_json  # noqa: E402
from cometjax import ops  # noqa: E402
from cometjax.core.formats import ActivationFormat, QuantizedActivation, QuantizedWeight, quantize_weight  # noqa: E402
from cometjax.core.kv import quantize_kv  # noqa: E402
from cometjax.core.kv_config import K_MODES, KVQuantConfig  # noqa: E402
from cometjax.core.numerics import pack_int4  # noqa: E402
from cometjax.ops import registry  # noqa: E402
from cometjax.pallas import kv4_attention, paged_kv4_attention, quantize_act, w4ax_matmul, w4ax_matmul_sm90  # noqa: E402
from cometjax.serving.kvcache import KV4Cache  # noqa: E402

SECTIONS = ("checks", "timings", "e2e")
DEFAULT_CAPS = {"checks": 150.0, "timings": 100.0, "e2e": 120.0}
DRY_CAPS = {"checks": 900.0, "timings": 900.0, "e2e": 900.0}  # a dry run runs every case (CI checks them all)
KERNELS = ("quantize_act", "w4ax_matmul", "w4ax_matmul_sm90", "kv4_attention", "paged_kv4_attention")


@dataclasses.dataclass(frozen=True)
class Scale:
  """Problem sizes: the real ones for a GPU, tiny ones for the interpreter."""
  k: int  # GEMM input channels of the checks
  n: int
  block: int  # FMPQ block size
  ms: tuple[int, ...]  # token counts of the checks
  heads: tuple[int, int, int]  # (query heads, KV heads, head_dim) of the attention checks
  context: int
  gemms: dict  # timed layer -> (K, N)
  timed_ms: tuple[int, ...]
  timed_context: int
  timed_batch: int
  iterations: int


GPU = Scale(k=4096, n=1024, block=128, ms=(1, 300), heads=(32, 8, 128), context=1024,
            gemms={"o": (4096, 4096), "gate_up": (4096, 28672), "qkv": (4096, 6144), "down": (14336, 4096)},
            timed_ms=(1, 256, 16, 2048), timed_context=8192, timed_batch=16, iterations=20)
DRY = Scale(k=256, n=128, block=64, ms=(1, 20), heads=(4, 2, 64), context=64, gemms={"o": (256, 128)},
            timed_ms=(4,), timed_context=128, timed_batch=2, iterations=2)


# ------------------------------------------------------------------------------------------------
# The run: cases, caps, JSON after every case


class Run:
  def __init__(self, out: pathlib.Path, caps: dict, dry_run: bool):
    self.out, self.caps, self.dry_run = out, caps, dry_run
    self.report = {**run_metadata(), "dry_run": dry_run, "interpret": dry_run, "caps_s": caps,
                   "cases": [], "summary": {}}
    self.section, self.section_start = None, time.perf_counter()

  def start(self, section: str):
    self.section, self.section_start = section, time.perf_counter()
    print(f"== {section} (cap {self.caps[section]:.0f} s)", flush=True)

  def case(self, name: str, fn, *, kernel: str | None = None, **fields) -> dict | None:
    """Runs fn() -> dict of results (raising AssertionError for a wrong answer) and records it."""
    row = dict(section=self.section, name=name, kernel=kernel, **fields)
    elapsed = time.perf_counter() - self.section_start
    if elapsed > self.caps[self.section]:
      row.update(status="skipped", reason=f"past the {self.section} cap ({elapsed:.0f} s > "
                                          f"{self.caps[self.section]:.0f} s)")
    else:
      start = time.perf_counter()
      try:
        row.update(fn() or {}, status="pass")
      except AssertionError as e:
        row.update(status="fail", error=str(e)[:2000])
      except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run is a result, not an abort
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
      row["seconds"] = round(time.perf_counter() - start, 3)
    self.report["cases"].append(row)
    self.write()
    print(f"  {row['status']:<7} {name} ({row.get('seconds', 0):.1f} s) {row.get('error', '')[:200]}", flush=True)
    return row

  def skip(self, name: str, reason: str, kernel: str | None = None) -> dict:
    row = dict(section=self.section, name=name, kernel=kernel, status="skipped", reason=reason)
    self.report["cases"].append(row)
    self.write()
    print(f"  skipped {name}: {reason}", flush=True)
    return row

  def write(self):
    cases = self.report["cases"]
    self.report["summary"] = {s: sum(c["status"] == s for c in cases) for s in ("pass", "fail", "error", "skipped")}
    self.report["validated_kernels"] = validated_kernels(cases)
    write_json(self.out, self.report)


def validated_kernels(cases: list[dict]) -> list[str]:
  """Kernels with at least one check and every check passed."""
  checks = [c for c in cases if c["section"] == "checks" and c.get("kernel")]
  kernels = sorted({c["kernel"] for c in checks})
  return [k for k in kernels if all(c["status"] == "pass" for c in checks if c["kernel"] == k)]


# ------------------------------------------------------------------------------------------------
# Inputs


def random_weight(rng, k: int, n: int, fmt: ActivationFormat, group_size=None) -> QuantizedWeight:
  w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
  return quantize_weight(w, 4, group_size=group_size, activation=fmt, perm=rng.permutation(k).astype(np.int32))


def random_activation(rng, m: int, k: int, dtype=jnp.bfloat16) -> jax.Array:
  x = rng.standard_normal((m, k)).astype(np.float32) * np.linspace(0.2, 8.0, k, dtype=np.float32)  # outliers
  return jnp.asarray(x, dtype)


def integer_case(rng, m: int, k: int, n: int, fmt: ActivationFormat):
  """(qx, qw, exact int64 product) with unit scales and codes over each precision's full range."""
  x8 = rng.integers(-127, 128, size=(m, fmt.int8_channels))
  x4 = rng.integers(-8, 8, size=(m, fmt.int4_channels))
  w = rng.integers(-8, 8, size=(k, n))
  x8[0], w[:, 0] = 127, -8  # the extremes: x16 products must stay exact in int32
  qx = QuantizedActivation(int8_part=jnp.asarray(np.stack([x8[:, 0::2], x8[:, 1::2]]), jnp.int8),
                           int4_part=pack_int4(jnp.asarray(x4, jnp.int8)), int8_scale=jnp.ones((m,)),
                           int4_scale=jnp.ones((m,)), format=fmt)
  qw = QuantizedWeight(data=pack_int4(jnp.asarray(w, jnp.int8), axis=0), scales=jnp.ones((1, n)), perm=None, bits=4,
                       group_size=None, shape=(k, n), activation=fmt)
  return qx, qw, np.concatenate([x8, x4], axis=1) @ w


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
  assert np.all(np.isfinite(got)), "non-finite output (an unwritten tile or a NaN)"
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def assert_close(got, want, tolerance: float) -> dict:
  error = relative_error(got, want)
  assert error <= tolerance, f"max relative error {error:.3e} > {tolerance:.0e}"
  return {"max_rel_err": error}


# ------------------------------------------------------------------------------------------------
# Checks: compiled kernels (interpreted in a dry run) against their references


def check_quantize_act(scale: Scale, m: int, interpret: bool) -> dict:
  rng = np.random.default_rng(m)
  fmt = ActivationFormat(scale.block, 1 if scale.k // scale.block < 8 else 8, scale.k // scale.block)
  x = random_activation(rng, m, scale.k)
  perm = jnp.asarray(rng.permutation(scale.k).astype(np.int32))
  got = quantize_act.quantize_act(x, perm, fmt=fmt, interpret=interpret)
  want = quantize_act.quantize_act_reference(x, perm, fmt)
  codes = [np.asarray(a, np.int32) for a in got.int_values()], [np.asarray(a, np.int32) for a in want.int_values()]
  diff = np.concatenate([np.abs(g - w).ravel() for g, w in zip(*codes)])
  mismatched = int(np.count_nonzero(diff))
  assert diff.max(initial=0) <= 1 and mismatched <= max(1, diff.size // 1000), (
      f"{mismatched} of {diff.size} codes differ (max {diff.max(initial=0)}); allowed: ties, one code apart")
  for name in ("int8_scale", "int4_scale"):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=1e-6)
  return {"codes": int(diff.size), "codes_one_apart": mismatched}


def check_gemm_exact(scale: Scale, interpret: bool, sm90: dict | None = None, int8_blocks: int = 1) -> dict:
  rng = np.random.default_rng(1)
  m, k, n = 64, max(scale.block * 4, 256), scale.n
  fmt = ActivationFormat(scale.block, int8_blocks, k // scale.block)
  qx, qw, exact = integer_case(rng, m, k, n, fmt)
  if sm90 is None:
    got = w4ax_matmul.w4ax_matmul(qx, qw, interpret=interpret)
  else:
    got = w4ax_matmul_sm90.w4ax_matmul_sm90(qx, qw, interpret=interpret, **sm90)
  np.testing.assert_array_equal(np.asarray(got).astype(np.int64), exact)
  np.testing.assert_array_equal(np.asarray(w4ax_matmul.w4ax_matmul_reference(qx, qw)).astype(np.int64), exact)
  return {"m": m, "k": k, "n": n}


def check_gemm(scale: Scale, m: int, n: int, group_size, int8_blocks: int, interpret: bool,
               sm90: dict | None = None) -> dict:
  rng = np.random.default_rng(m + n)
  fmt = ActivationFormat(scale.block, int8_blocks, scale.k // scale.block)
  qw = random_weight(rng, scale.k, n, fmt, group_size)
  qx = quantize_act.quantize_act_reference(random_activation(rng, m, scale.k), qw.perm, fmt)
  want = w4ax_matmul.w4ax_matmul_reference(qx, qw)
  if sm90 is None:
    got = w4ax_matmul.w4ax_matmul(qx, qw, interpret=interpret)
  else:
    got = w4ax_matmul_sm90.w4ax_matmul_sm90(qx, qw, interpret=interpret, **sm90)
  return assert_close(got, want, 1e-5)


def check_linear(scale: Scale, implementation: str) -> dict:
  rng = np.random.default_rng(7)
  fmt = ActivationFormat(scale.block, 1, scale.k // scale.block)
  qw = random_weight(rng, scale.k, scale.n, fmt)
  x = random_activation(rng, 12, scale.k).reshape(3, 4, scale.k)
  want = ops.linear(x, qw, implementation="xla")
  return assert_close(ops.linear(x, qw, implementation=implementation), want, 2e-2)  # bf16 output


def check_kv4_attention(scale: Scale, queries: int, interpret: bool) -> dict:
  rng = np.random.default_rng(queries)
  hq, hkv, d = scale.heads
  batch, s = 2, scale.context
  k, v = (jnp.asarray(rng.standard_normal((batch, s, hkv, d)), jnp.float32) for _ in range(2))
  kv = quantize_kv(k, v)
  lengths = jnp.asarray([s, s // 2 + 3], jnp.int32)
  q = jnp.asarray(rng.standard_normal((batch, queries, hq, d)), jnp.bfloat16)
  got = kv4_attention.kv4_attention(q, kv, lengths, interpret=interpret)
  return assert_close(got, kv4_attention.kv4_attention_reference(q, kv, lengths), 2e-2)


def random_paged_layer(rng, mode: str, batch: int, context: int, heads, dtype=jnp.bfloat16):
  _, hkv, d = heads
  config = KVQuantConfig(k_mode=mode, group_tokens=32)
  layer = KV4Cache.create(1, batch, context, hkv, d, dtype=dtype, config=config,
                          page_size=None if mode == "channel" else 32).paged_layer(0)
  table = rng.permutation(layer.num_pages).astype(np.int32).reshape(layer.page_table.shape)
  codes = lambda x: jnp.asarray(rng.integers(0, 256, x.shape), jnp.uint8)
  uniform = lambda x, lo, hi: jnp.asarray(rng.uniform(lo, hi, x.shape), jnp.float32)
  return dataclasses.replace(
      layer, k=codes(layer.k), v=codes(layer.v), k_scale=uniform(layer.k_scale, 0.02, 0.1),
      k_zero=uniform(layer.k_zero, 0, 15), v_scale=uniform(layer.v_scale, 0.02, 0.1), v_zero=uniform(layer.v_zero, 0, 15),
      k_recent=jnp.asarray(rng.standard_normal(layer.k_recent.shape), jnp.float32),
      length=jnp.asarray(rng.integers(1, context + 1, batch), jnp.int32), page_table=jnp.asarray(table))


def check_paged(scale: Scale, mode: str, interpret: bool) -> dict:
  rng = np.random.default_rng(len(mode))
  layer = random_paged_layer(rng, mode, 3, scale.context, scale.heads)
  q = jnp.asarray(rng.standard_normal((3, scale.heads[0], scale.heads[2])), jnp.bfloat16)
  got = paged_kv4_attention.paged_kv4_attention(q, layer, interpret=interpret)
  return assert_close(got, paged_kv4_attention.paged_kv4_attention_reference(q, layer), 2e-2)


def run_checks(run: Run, scale: Scale, interpret: bool):
  hopper = registry.is_hopper()
  for m in scale.ms:
    run.case(f"quantize_act M={m}", lambda m=m: check_quantize_act(scale, m, interpret), kernel="quantize_act")
  run.case("w4ax_matmul exact integers", lambda: check_gemm_exact(scale, interpret), kernel="w4ax_matmul")
  gemm_cases = [(1, scale.n, None, 1), (300 if not interpret else 20, scale.n, scale.block, 2),
                (16, 2 * scale.n, None, 0)]
  for m, n, group, int8_blocks in gemm_cases:
    run.case(f"w4ax_matmul M={m} N={n} group={group} int8_blocks={int8_blocks}",
             lambda m=m, n=n, g=group, b=int8_blocks: check_gemm(scale, m, n, g, b, interpret), kernel="w4ax_matmul")
  sm90_variants = [dict(schedule="persistent"), dict(schedule="grid"),
                   dict(schedule="grid", warp_specialized=True), dict(schedule="persistent", warp_specialized=True)]
  for variant in sm90_variants:
    label = f"{variant['schedule']}{' ws' if variant.get('warp_specialized') else ''}"
    if not (hopper or interpret):
      run.skip(f"w4ax_matmul_sm90 {label}", "not a Hopper GPU")
      continue
    if interpret and variant.get("warp_specialized") and variant["schedule"] != "grid":
      run.skip(f"w4ax_matmul_sm90 {label}", "the Mosaic GPU interpreter runs warp specialization only on the grid")
      continue
    # interpreted warp specialization takes one pipeline per tile: W4A4 with per-channel scales
    int8_blocks = 0 if interpret and variant.get("warp_specialized") else 2
    run.case(f"w4ax_matmul_sm90 {label} exact integers",
             lambda v=variant, b=int8_blocks: check_gemm_exact(scale, interpret, v, min(b, 1)),
             kernel="w4ax_matmul_sm90")
    for m in scale.ms:
      run.case(f"w4ax_matmul_sm90 {label} M={m}",
               lambda v=variant, m=m, b=int8_blocks: check_gemm(scale, m, scale.n, None, b, interpret, v),
               kernel="w4ax_matmul_sm90")
  for queries in (1, 16):
    run.case(f"kv4_attention T={queries}", lambda q=queries: check_kv4_attention(scale, q, interpret),
             kernel="kv4_attention")
  for mode in K_MODES:
    run.case(f"paged_kv4_attention k_mode={mode}", lambda mode=mode: check_paged(scale, mode, interpret),
             kernel="paged_kv4_attention")
  implementation = "interpret" if interpret else "pallas"
  run.case(f"ops.linear {implementation} vs xla", lambda: check_linear(scale, implementation), kernel="w4ax_matmul")
  if interpret:
    run.skip("paged pool past 2**31 bytes (child process)", "dry run: no 5 GB pool on a CPU")
  else:
    run.case("paged pool past 2**31 bytes (child process)", lambda: child("offsets", timeout=120),
             kernel="paged_kv4_attention")


# ------------------------------------------------------------------------------------------------
# Timings: medians over rotating inputs, XLA baselines in the same run


def median_ms(fn, arg_sets, iterations: int, warmup: int = 2) -> float:
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  samples = []
  for i in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    samples.append((time.perf_counter() - start) * 1e3)
  return statistics.median(samples)


def time_gemm(scale: Scale, layer: str, m: int, interpret: bool) -> dict:
  """XLA bf16, XLA int8, W4Ax (quantize_act + GEMM, and the GEMM alone; Triton and sm90) at one shape."""
  k, n = scale.gemms[layer]
  rng = np.random.default_rng(m)
  copies = 3
  fmt = ActivationFormat.for_features(k, scale.block, 0.25)
  qws = [random_weight(rng, k, n, fmt) for _ in range(copies)]
  xs = [random_activation(rng, m, k) for _ in range(copies)]
  ws = [jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16) for _ in range(copies)]
  bf16 = median_ms(jax.jit(lambda x, w: jnp.dot(x, w)), list(zip(xs, ws)), scale.iterations)
  w8 = [w.astype(jnp.int8) for w in ws]
  int8 = median_ms(jax.jit(lambda x, w: jnp.dot(x.astype(jnp.int8), w, preferred_element_type=jnp.int32)),
                   list(zip(xs, w8)), scale.iterations)
  qxs = [quantize_act.quantize_act_reference(x, qw.perm, fmt) for x, qw in zip(xs, qws)]
  gemm = jax.jit(lambda qx, qw: w4ax_matmul.w4ax_matmul(qx, qw, out_dtype=jnp.bfloat16, interpret=interpret))
  triton = median_ms(gemm, list(zip(qxs, qws)), scale.iterations)
  linear = jax.jit(lambda x, qw: ops.linear(x, qw, implementation="interpret" if interpret else "pallas"))
  end_to_end = median_ms(linear, list(zip(xs, qws)), scale.iterations)
  row = dict(k=k, n=n, m=m, xla_bf16_ms=bf16, xla_int8_ms=int8, w4ax_gemm_ms=triton, w4ax_linear_ms=end_to_end,
             speedup_vs_bf16=bf16 / end_to_end, gemm_speedup_vs_bf16=bf16 / triton)
  if registry.is_hopper() or interpret:
    sm90 = jax.jit(lambda qx, qw: w4ax_matmul_sm90.w4ax_matmul_sm90(qx, qw, out_dtype=jnp.bfloat16,
                                                                     interpret=interpret))
    k_major = [qw.with_layout("nk") for qw in qws]  # stored as the kernel reads it: no per-call transpose
    row["sm90_gemm_ms"] = median_ms(sm90, list(zip(qxs, k_major)), scale.iterations)
    row["sm90_speedup_vs_bf16"] = bf16 / row["sm90_gemm_ms"]
  return row


def time_decode_attention(scale: Scale, interpret: bool) -> dict:
  """KV4 decode attention (contiguous and paged, channel K) against bf16 attention over the same context."""
  hq, hkv, d = scale.heads
  batch, s = scale.timed_batch, scale.timed_context
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((batch, hq, d)), jnp.bfloat16)
  key = jax.random.key(0)
  k, v = (jax.random.normal(jax.random.fold_in(key, i), (batch, s, hkv, d), jnp.bfloat16) for i in range(2))
  lengths = jnp.full((batch,), s, jnp.int32)

  def bf16_attention(q, k, v):  # [B, Hq, D], [B, S, Hkv, D]: jax's attention (cuDNN's where it applies)
    return jax.nn.dot_product_attention(q[:, None], k, v)[:, 0]

  bf16 = median_ms(jax.jit(bf16_attention), [(q, k, v)], scale.iterations)
  kv = jax.jit(quantize_kv)(k, v)
  contiguous = median_ms(jax.jit(lambda q, kv, n: kv4_attention.kv4_decode_attention(q, kv, n, interpret=interpret)),
                         [(q, kv, lengths)], scale.iterations)
  layer = random_paged_layer(rng, "channel", batch, s, scale.heads)
  layer = dataclasses.replace(layer, length=lengths)
  paged = median_ms(jax.jit(lambda q, kv: paged_kv4_attention.paged_kv4_attention(q, kv, interpret=interpret)),
                    [(q, layer)], scale.iterations)
  return dict(batch=batch, context=s, heads=list(scale.heads), bf16_ms=bf16, kv4_ms=contiguous, paged_kv4_ms=paged,
              kv4_speedup_vs_bf16=bf16 / contiguous, paged_speedup_vs_bf16=bf16 / paged)


def run_timings(run: Run, scale: Scale, interpret: bool):
  for m in scale.timed_ms:  # M = 1 and 256 first: the cap drops what does not fit
    for layer in scale.gemms:
      run.case(f"gemm {layer} M={m}", lambda layer=layer, m=m: time_gemm(scale, layer, m, interpret))
  run.case(f"decode attention context={scale.timed_context}", lambda: time_decode_attention(scale, interpret))


# ------------------------------------------------------------------------------------------------
# Child processes: the offsets probe and the end-to-end cases


def child(task: str, timeout: float, dry_run: bool = False) -> dict:
  """Runs `--child task` in a fresh process; its last stdout line is the JSON result."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", task] + (["--dry-run"] if dry_run else [])
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    raise AssertionError(f"child {task!r} did not finish within {timeout:.0f} s") from None
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert proc.returncode == 0 and lines, (f"child {task!r} exited with {proc.returncode}: "
                                          f"{(proc.stderr or proc.stdout)[-1500:]}")
  return json.loads(lines[-1])


def probe_offsets() -> dict:
  """One layer whose code pools are each past 2**31 bytes; the rows' pages sit at the top of the pool, so
  32-bit byte offsets would wrap."""
  from cometjax.core.kv import PagedKV4
  hkv, d, page, batch, pages_per_row = 8, 128, 32, 4, 8
  per_page = page * hkv * d // 2
  num_pages = (2**31) // per_page + 1024
  config = KVQuantConfig(k_mode="token")
  table = jnp.asarray((num_pages - 1 - np.arange(batch * pages_per_row)).reshape(batch, pages_per_row), jnp.int32)
  layer = PagedKV4.create(batch, num_pages, page, hkv, d, table, config)
  key = jax.random.key(0)
  layer = dataclasses.replace(layer, k=jax.random.bits(key, layer.k.shape, jnp.uint8),
                              v=jax.random.bits(jax.random.fold_in(key, 1), layer.v.shape, jnp.uint8),
                              length=jnp.full((batch,), page * pages_per_row, jnp.int32))
  q = jax.random.normal(key, (batch, 32, d), jnp.bfloat16)
  got = paged_kv4_attention.paged_kv4_attention(q, layer)
  want = paged_kv4_attention.paged_kv4_attention_reference(q, layer)
  return {"pool_bytes": int(layer.k.nbytes), **assert_close(got, want, 2e-2)}


def e2e_case(preset_name: str, dry_run: bool) -> dict:
  """One generate run of a Llama-3-8B-shaped model (batch 16, 128 in / 128 out) with one preset."""
  from bench import e2e
  from bench.common import use_kernels_where_supported
  from cometjax.serving.generate import generate
  config = e2e.SMOKE_SHAPE if dry_run else e2e.SHAPES["llama3-8b"]
  batch, in_len, out_len = (2, 16, 8) if dry_run else (16, 128, 128)
  preset = next(p for p in e2e.PRESETS if p.name == preset_name)
  model = e2e.apply_preset(e2e.random_model(config), preset, 32 if dry_run else 128)
  layers = use_kernels_where_supported(model, "interpret" if dry_run else "pallas")
  prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, in_len)).tolist()
  start = time.perf_counter()
  generate(model, prompts, out_len, stop_at_eos=False, kv=preset.kv)  # compiles
  compile_s = time.perf_counter() - start
  result = generate(model, prompts, out_len, stop_at_eos=False, kv=preset.kv)
  seconds = result.prefill_s + result.decode_s
  return dict(preset=preset_name, batch=batch, in_len=in_len, out_len=out_len, layers=layers,
              tokens_per_s=batch * out_len / seconds, prefill_s=result.prefill_s, decode_s=result.decode_s,
              first_call_s=compile_s)


def run_e2e(run: Run, dry_run: bool):
  rows = {}
  for preset in ("w4ax-kv4", "bf16", "w4a16"):
    left = run.caps["e2e"] - (time.perf_counter() - run.section_start)
    row = run.case(f"e2e {preset}", lambda p=preset, left=left: child(f"e2e:{p}", max(left, 1.0), dry_run))
    rows[preset] = row
  base = rows["bf16"]
  for preset, row in rows.items():
    if row["status"] == "pass" and base["status"] == "pass":
      row["speedup_vs_our_bf16"] = row["tokens_per_s"] / base["tokens_per_s"]
  run.write()


# ------------------------------------------------------------------------------------------------
# The validation table


def table_entry(report: dict) -> dict:
  """The validated_kernels.json entry a (non-dry) run supports: its validated kernels, and the sm90 GEMM
  preferred over the Triton one where it was faster on most timed shapes."""
  timed = [c for c in report["cases"] if c["section"] == "timings" and c["status"] == "pass" and "sm90_gemm_ms" in c]
  entry = {"validated": report["validated_kernels"], "from": f"{report['date']} {report['commit'][:12]}"}
  faster = sum(c["sm90_gemm_ms"] < c["w4ax_gemm_ms"] for c in timed)
  if timed and faster * 2 > len(timed) and "w4ax_matmul_sm90" in entry["validated"]:
    entry["prefer"] = {"w4ax_matmul": "w4ax_matmul_sm90"}
  return {report["device"]: entry}


def print_summary(report: dict):
  print(f"{'section':<8} {'status':<8} {'seconds':>8}  case")
  for c in report["cases"]:
    extra = {k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()
             if k.endswith(("_ms", "speedup_vs_bf16", "max_rel_err", "tokens_per_s"))}
    print(f"{c['section']:<8} {c['status']:<8} {c.get('seconds', 0):>8.1f}  {c['name']} {extra if extra else ''}")
  print("summary:", report["summary"], "validated:", report["validated_kernels"])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=None, help="directory for gpu_validate_<device>.json")
  parser.add_argument("--dry-run", action="store_true", help="CPU, interpret mode, tiny shapes")
  parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
  parser.add_argument("--caps", nargs=3, type=float, default=None, metavar=("CHECKS", "TIMINGS", "E2E"))
  parser.add_argument("--table", default=None, help="print the validated_kernels.json entry of this result file")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.table:
    entry = table_entry(json.loads(pathlib.Path(args.table).read_text()))
    print(json.dumps(entry, indent=1))
    return entry
  if args.child:
    result = probe_offsets() if args.child == "offsets" else e2e_case(args.child.split(":", 1)[1], args.dry_run)
    print(json.dumps(result))
    return result
  if not args.dry_run and jax.default_backend() != "gpu":
    parser.error("a validation run needs a GPU; use --dry-run on CPU")
  if args.out is None:
    parser.error("--out DIR is required")
  caps = dict(zip(SECTIONS, args.caps)) if args.caps else (DRY_CAPS if args.dry_run else DEFAULT_CAPS)
  out = pathlib.Path(args.out) / f"gpu_validate_{device_tag()}{'_dry_run' if args.dry_run else ''}.json"
  run = Run(out, caps, args.dry_run)
  scale = DRY if args.dry_run else GPU
  sections = {"checks": lambda: run_checks(run, scale, args.dry_run),
              "timings": lambda: run_timings(run, scale, args.dry_run), "e2e": lambda: run_e2e(run, args.dry_run)}
  for section in args.sections:
    run.start(section)
    sections[section]()
  print_summary(run.report)
  print(f"wrote {out}")
  return run.report


if __name__ == "__main__":
  main()
