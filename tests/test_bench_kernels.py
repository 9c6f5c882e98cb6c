"""bench/kernel_speed.py --smoke runs end to end (so the benchmark script cannot rot)."""

import json

import pytest

from conftest import load_bench_script


@pytest.mark.slow
def test_kernel_benchmark_smoke(tmp_path):
  bench = load_bench_script("kernel_speed")
  out = tmp_path / "kernels_smoke.json"
  bench.main(["--smoke", "--quiet", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["smoke"] is True and report["interpret"] is True
  for field in ("device", "jax_version", "commit", "date"):
    assert report[field]
  ops = {(row["op"], row["baseline"]) for row in report["rows"]}
  assert {("w4ax_matmul", "xla_bf16"), ("w4ax_matmul", "xla_int8"), ("quantize_act", "xla_reference"),
          ("kv4_attention", "jax_dpa"), ("w4ax_matmul_sm90", "xla_bf16"), ("w4ax_matmul_sm90", "xla_int8"),
          ("w4ax_matmul_sm90", "pallas_triton")} <= ops
  for row in report["rows"]:
    for field in ("op", "shape", "m", "int8_fraction", "ms", "baseline", "baseline_ms", "speedup"):
      assert field in row
    assert row["ms"] > 0 and row["speedup"] > 0


def test_kernel_benchmark_kernels_filter(tmp_path):
  bench = load_bench_script("kernel_speed")
  out = tmp_path / "kernels_filter.json"
  bench.main(["--smoke", "--quiet", "--kernels", "quantize_act", "--skip-attention", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["kernels"] == ["quantize_act"]
  assert report["rows"] and {row["op"] for row in report["rows"]} == {"quantize_act"}
