import json

import pytest

from conftest import load_bench_script


@pytest.mark.slow
def test_e2e_benchmark_smoke(tmp_path):
  bench = load_bench_script("e2e")
  out = tmp_path / "e2e.json"
  bench.main(["--smoke", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["smoke"] is True and report["device"] and report["commit"]
  presets = {row["preset"] for row in report["rows"] if row["engine"] == "cometjax"}
  assert presets == {"bf16", "w4a16", "w8a8", "w4a8-kv4", "w4ax-kv4"}
  for row in report["rows"]:
    for field in ("model_shape", "engine", "preset", "batch", "in_len", "out_len", "tokens_per_s", "peak_mem_gb"):
      assert field in row
    assert row["tokens_per_s"] > 0
