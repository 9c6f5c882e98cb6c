import json

import pytest

from conftest import load_bench_script, require_data


@pytest.mark.slow
@pytest.mark.realdata
def test_serve_load_smoke(tmp_path):
  require_data("llama", "stories260K", "hf")
  bench = load_bench_script("serve_load")
  out = tmp_path / "serve_load.json"
  bench.main(["--smoke", "--out", str(out)])  # starts `cometjax serve`, stops it at the end
  report = json.loads(out.read_text())
  assert report["smoke"] is True and report["device"] and report["commit"]
  assert [p["clients"] for p in report["phases"]] == [1, 4]
  for phase in report["phases"]:
    assert phase["requests"] == 2 * phase["clients"] and 0 < phase["completion_tokens"] <= 16 * phase["requests"]
    assert phase["tokens_per_s"] > 0 and 0 < phase["ttft_ms"]["p50"] <= phase["ttft_ms"]["p99"]
    assert phase["itl_ms"]["p50"] > 0
  assert report["throughput_ratio_max_clients_vs_1"] > 0  # its size is the bench's finding, not a test's
