"""`calibrate_and_quantize`: statistics on calibration windows (when the config needs them), then
`cometjax.quant.transform.quantize`."""

from __future__ import annotations

from calib.stats import collect_stats
from cometjax.quant.config import QuantConfig
from cometjax.quant.transform import quantize


def calibrate_and_quantize(model, config: QuantConfig, windows=None, *, batch_size: int = 8,
                           progress: bool = True):
  """(quantized model, stats or None): collects statistics on `windows` (int [n, T]) when the config
  needs them, then quantizes."""
  stats = None
  if config.needs_calibration:
    if windows is None:
      raise ValueError("windows (calibration token windows) are required: this config needs calibration "
                       "statistics")
    stats = collect_stats(model, config, windows, batch_size=batch_size, progress=progress)
  return quantize(model, config, stats, progress=progress), stats
