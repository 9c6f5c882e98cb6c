"""bench/outlier_profile.py's per-input numbers on a hand-made channel profile."""

import numpy as np

from bench.outlier_profile import channel_profile, summary


def test_outliers_in_three_blocks_fill_one_block_once_permuted():
  absmax = np.ones(576)
  absmax[[5, 200, 450]] = [10.0, 50.0, 9.0]  # three channels > 8x the median, in blocks 0, 1 and 3
  row = channel_profile(absmax)
  assert row["max_over_median"] == 50.0 and row["top_channels"][:3] == [200, 5, 450]
  assert (row["outliers_8x"], row["blocks_touched_8x"], row["blocks_needed_8x"]) == (3, 3, 1)
  assert (row["outliers_32x"], row["blocks_touched_32x"], row["blocks_needed_32x"]) == (1, 1, 1)
  many = np.ones(1536)
  many[::7] = 20.0  # 220 outlying channels spread over every block need two once permuted
  spread = channel_profile(many)
  assert (spread["outliers_8x"], spread["blocks_touched_8x"], spread["blocks_needed_8x"]) == (220, 12, 2)
  s = summary([dict(row, layer=0, input="attn in (q/k/v)"), dict(spread, layer=0, input="down_proj in"),
               dict(row, layer=0, input="o_proj in"), dict(row, layer=0, input="mlp in (gate/up)")])
  assert s["max_blocks_needed_8x"] == 2 and s["inputs_with_outliers_32x"] == 3
