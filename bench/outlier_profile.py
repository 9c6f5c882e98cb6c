"""Outlier profile of a model's linear-layer inputs: does FMPQ's premise (a few outlying channels) hold?

    python bench/outlier_profile.py                     # SmolLM2-135M on the second half of WikiText-2
    python bench/outlier_profile.py --windows 16 --out bench/results/outliers_smollm2.json

For every layer and projection input (q/k/v share one input, gate/up share one), on the calibration text:
max |x| per input channel, then the ratio of the largest channel to the median channel, the number of
channels above 8x and 32x the median, how many 128-channel blocks those channels touch in the model's own
channel order, and how many blocks they fill once FMPQ permutes them together (ceil(n / 128)). Writes JSON
(with date, device, jax version, commit) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import RESULTS, run_metadata, write_json  # noqa: E402

BLOCK = 128
THRESHOLDS = (8.0, 32.0)
# one entry per distinct input: q/k/v read the same tensor, and so do gate/up
INPUTS = {"self_attn.q_proj": "attn in (q/k/v)", "self_attn.o_proj": "o_proj in",
          "mlp.gate_proj": "mlp in (gate/up)", "mlp.down_proj": "down_proj in"}


def channel_profile(absmax: np.ndarray) -> dict:
  """Ratios and block counts of one input's per-channel max |x| [K]."""
  absmax = np.asarray(absmax, np.float64)
  median = float(np.median(absmax))
  row = dict(channels=int(absmax.size), max=float(absmax.max()), median=median,
             max_over_median=float(absmax.max() / median) if median > 0 else math.inf,
             top_channels=[int(c) for c in np.argsort(-absmax)[:8]])
  for t in THRESHOLDS:
    outliers = np.flatnonzero(absmax > t * median)
    row[f"outliers_{t:g}x"] = int(outliers.size)
    row[f"blocks_touched_{t:g}x"] = int(np.unique(outliers // BLOCK).size)
    row[f"blocks_needed_{t:g}x"] = int(math.ceil(outliers.size / BLOCK))
  return row


def profile_from_stats(stats, in_features: dict[str, int]) -> list[dict]:
  """Rows (layer, input, ...) from `calib.stats.CalibrationStats` collected without rotation; padding
  channels beyond each layer's in_features are dropped."""
  rows = []
  for name, layer_stats in stats.layers.items():
    prefix, _, projection = name.partition(".")[2].partition(".")
    if projection not in INPUTS:
      continue
    k = in_features[name]
    rows.append(dict(layer=int(prefix), input=INPUTS[projection], **channel_profile(layer_stats.absmax[:k])))
  rows.sort(key=lambda r: (r["layer"], list(INPUTS.values()).index(r["input"])))
  return rows


def summary(rows: list[dict]) -> dict:
  ratios = np.asarray([r["max_over_median"] for r in rows])
  out = dict(inputs=len(rows), median_max_over_median=float(np.median(ratios)),
             max_max_over_median=float(ratios.max()))
  for t in THRESHOLDS:
    needed = np.asarray([r[f"blocks_needed_{t:g}x"] for r in rows])
    out[f"inputs_with_outliers_{t:g}x"] = int(np.sum(needed > 0))
    out[f"max_blocks_needed_{t:g}x"] = int(needed.max())
    out[f"max_blocks_touched_{t:g}x"] = int(max(r[f"blocks_touched_{t:g}x"] for r in rows))
  for label in INPUTS.values():
    mine = [r["max_over_median"] for r in rows if r["input"] == label]
    out[f"median_ratio[{label}]"] = float(np.median(mine))
  return out


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
  for label in INPUTS.values():
    mine = [r for r in rows if r["input"] == label]
    layers = [r["layer"] for r in mine]
    top.semilogy(layers, [r["max_over_median"] for r in mine], marker="o", ms=3, label=label)
    bottom.plot(layers, [r["outliers_8x"] for r in mine], marker="o", ms=3, label=label)
  top.set_ylabel("max / median channel |x|")
  top.set_title(title)
  top.legend(fontsize=8)
  top.grid(True, which="both", alpha=0.3)
  needed = max(r["blocks_needed_8x"] for r in rows)
  touched = max(r["blocks_touched_8x"] for r in rows)
  bottom.set_ylabel("channels > 8x median")
  bottom.set_title(f"permuted, they fit in at most {needed} {BLOCK}-channel block(s) per input "
                   f"(in the model's order they touch up to {touched})", fontsize=9)
  bottom.set_xlabel("layer")
  bottom.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_profile(rows: list[dict], out: pathlib.Path, notes: list[str]) -> dict:
  payload = {**run_metadata(), "block": BLOCK, "thresholds": list(THRESHOLDS), "notes": notes,
             "summary": summary(rows), "rows": rows}
  write_json(out, payload)
  plot(rows, out.with_suffix(".png"), "SmolLM2-135M input channels (calibration text)")
  return payload


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens")
  parser.add_argument("--out", default=str(RESULTS / "outliers_smollm2.json"))
  args = parser.parse_args(argv)
  from bench.accuracy import smollm2_data
  from calib.stats import collect_stats
  from cometjax.quant import config as qc

  loaded, calib, _, _ = smollm2_data(args.windows)
  config = qc.preset("w4ax").replace(weights=qc.WeightQuantConfig(method="rtn"))
  stats = collect_stats(loaded.model, config, calib, batch_size=8)
  in_features = {name: loaded.config.hidden_size if not name.endswith("down_proj")
                 else loaded.config.intermediate_size for name in stats.layers}
  rows = profile_from_stats(stats, in_features)
  payload = write_profile(rows, pathlib.Path(args.out),
                          [f"calibration: {len(calib)} windows of 512 tokens from the second half of WikiText-2"])
  print(payload["summary"])
  return payload


if __name__ == "__main__":
  main()
