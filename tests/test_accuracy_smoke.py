"""A seconds-long run of bench/accuracy.py on the synthetic outlier Llama (the full run is the bench)."""

import json

import pytest

from bench import accuracy

REQUIRED = {"model", "preset", "calibration", "ppl", "fp_ppl", "int4_block_fraction", "weight_bytes"}


@pytest.mark.slow
def test_accuracy_smoke(tmp_path):
  out = tmp_path / "accuracy.json"
  rows = accuracy.main(["--smoke", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["smoke"] is True and len(saved["rows"]) == len(rows) >= 3
  assert (tmp_path / "accuracy.md").exists()
  for row in rows:
    assert REQUIRED <= set(row)
  by = {(r["preset"], r["calibration"]): r for r in rows}
  fp = by[("fp", "none")]["ppl"]
  w4a4 = by[("w4a4", "rtn")]["ppl"]
  fmpq = [r for r in rows if r["preset"] == "w4ax"]
  assert fmpq and all(r["int4_block_fraction"] >= 0.75 for r in fmpq)
  # the outlier channels break INT4 blocks; FMPQ keeps them at INT8. (With one scale per block, format v3, W4A4
  # already isolates the outliers' blocks: its increase fell about 3x from v2, so the margin here is smaller.)
  assert min(r["ppl"] for r in fmpq) - fp < 0.9 * (w4a4 - fp)
  # 4-bit codes + scales per quantized parameter (bytes_per_param counts every stored byte, embedding included)
  assert all(0.5 < r["weight_bytes"] / r["quantized_params"] < 0.8 for r in rows if r["weight_bytes"])
