"""bench/gpu_validate.py, the one prepared GPU run: its dry run on CPU (interpret mode, tiny shapes) writes every
check and timing row, and the validation table it supports lists only kernels whose checks all passed."""

import json

import pytest

from conftest import load_bench_script


@pytest.mark.slow
def test_dry_run_writes_every_case(tmp_path):
  bench = load_bench_script("gpu_validate")
  report = bench.main(["--dry-run", "--out", str(tmp_path)])
  written = json.loads(next(tmp_path.glob("gpu_validate_*_dry_run.json")).read_text())
  assert written["cases"] == json.loads(json.dumps(report["cases"]))
  by_status = {}
  for case in written["cases"]:
    by_status.setdefault(case["status"], []).append(case["name"])
  assert not by_status.get("fail") and not by_status.get("error"), by_status
  # the two skips a dry run must make: the >2**31-byte pool, and warp specialization off the grid schedule
  assert sorted(by_status.get("skipped", [])) == ["paged pool past 2**31 bytes (child process)",
                                                  "w4ax_matmul_sm90 persistent ws"]
  names = {case["name"] for case in written["cases"]}
  for expected in ("quantize_act M=1", "quantize_act M=20", "w4ax_matmul exact integers", "kv4_attention T=1",
                   "kv4_attention T=16", "paged_kv4_attention k_mode=channel", "ops.linear interpret vs xla",
                   "w4ax_matmul_sm90 grid ws M=20", "gemm o M=4", "decode attention context=128", "e2e w4ax-kv4",
                   "e2e bf16", "e2e w4a16"):
    assert expected in names, expected
  gemm = next(c for c in written["cases"] if c["name"] == "gemm o M=4")
  assert {"xla_bf16_ms", "xla_int8_ms", "w4ax_gemm_ms", "w4ax_linear_ms", "sm90_gemm_ms"} <= set(gemm)
  assert set(written["validated_kernels"]) == set(bench.KERNELS)


def test_table_lists_only_kernels_whose_checks_all_passed():
  bench = load_bench_script("gpu_validate")
  cases = [dict(section="checks", name="a", kernel="w4ax_matmul", status="pass"),
           dict(section="checks", name="b", kernel="w4ax_matmul", status="fail"),
           dict(section="checks", name="c", kernel="quantize_act", status="pass"),
           dict(section="checks", name="d", kernel="w4ax_matmul_sm90", status="pass"),
           dict(section="timings", name="t1", status="pass", sm90_gemm_ms=1.0, w4ax_gemm_ms=2.0),
           dict(section="timings", name="t2", status="pass", sm90_gemm_ms=1.5, w4ax_gemm_ms=2.0)]
  assert bench.validated_kernels(cases) == ["quantize_act", "w4ax_matmul_sm90"]
  report = dict(cases=cases, validated_kernels=bench.validated_kernels(cases), device="NVIDIA H200",
                date="2026-12-01T00:00:00+00:00", commit="0123456789abcdef")
  entry = bench.table_entry(report)["NVIDIA H200"]
  assert entry["validated"] == ["quantize_act", "w4ax_matmul_sm90"]
  assert entry["prefer"] == {"w4ax_matmul": "w4ax_matmul_sm90"}  # faster on both timed shapes
