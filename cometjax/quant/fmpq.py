"""FMPQ: fine-grained mixed-precision activation plans from calibration statistics.

For one linear layer with K input channels:
1. The input plan (`input_plan`): the channel count the quantized matmul sees. K is padded with zero
   channels up to a multiple of the block size (zero activations and zero weight rows add nothing and
   leave every per-token scale unchanged), and, with rotation="hadamard", the down_proj input is padded
   up to a size where a Hadamard matrix exists and rotated online (see `cometjax.quant.rotation`).
2. The block plan (`plan_activation`): channels ranked by a calibration statistic (max |x| or RMS,
   measured in the transformed input space); the top channels fill the first `num_int8_blocks` blocks
   (INT8), every other channel keeps its order in the INT4 blocks, padding last. The result is the
   permutation `perm` ([Kp] int32, x_perm = x_padded[..., perm]) and an `ActivationFormat`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cometjax.core.formats import ActivationFormat
from cometjax.core.rotations import hadamard_size_at_least
from cometjax.quant.config import ActivationQuantConfig, QuantConfig
from cometjax.quant.rotation import online_rotation

ONLINE_ROTATION_LAYERS = ("down_proj",)


@dataclasses.dataclass(frozen=True)
class InputPlan:
  """How a layer's input reaches the quantized matmul: zero-pad K -> padded_features, then rotate."""
  in_features: int
  padded_features: int
  block_size: int | None  # FMPQ block size (None: A16)
  online_rotation: bool

  def rotation(self):  # HadamardRotation over Kp, or None
    return online_rotation(self.padded_features) if self.online_rotation else None

  def rotation_matrix(self) -> np.ndarray | None:  # float64 [Kp, Kp]
    return self.rotation().matrix() if self.online_rotation else None

  def transform(self, x: np.ndarray) -> np.ndarray:
    """x [..., K] -> [..., Kp] as the quantized leaf transforms it (numpy/jax arrays both work)."""
    import jax.numpy as jnp
    if self.padded_features != self.in_features:
      pad = [(0, 0)] * (x.ndim - 1) + [(0, self.padded_features - self.in_features)]
      x = jnp.pad(x, pad)
    if self.online_rotation:
      x = self.rotation().apply(jnp.asarray(x))
    return x


def input_plan(layer_name: str, in_features: int, config: QuantConfig) -> InputPlan:
  acts = config.activations
  block = acts.block_size_for(in_features) if acts is not None else None
  online = config.rotation == "hadamard" and layer_name.split(".")[-1] in ONLINE_ROTATION_LAYERS
  multiple = block or 1
  if config.weights is not None and config.weights.bits == 4:
    multiple = math.lcm(multiple, 2)
  if config.weights is not None and config.weights.group_size is not None:
    multiple = math.lcm(multiple, config.weights.group_size)
  if online:
    padded = hadamard_size_at_least(in_features, multiple)
  else:
    padded = -(-in_features // multiple) * multiple
  return InputPlan(in_features, padded, block, online)


@dataclasses.dataclass(frozen=True)
class ActivationPlan:
  perm: np.ndarray | None  # int32 [Kp] or None (identity)
  format: ActivationFormat

  @property
  def int4_block_fraction(self) -> float:
    return self.format.int4_block_fraction


def channel_scores(absmax: np.ndarray, sumsq: np.ndarray, count: int, ranking: str) -> np.ndarray:
  if ranking == "absmax":
    return np.asarray(absmax, np.float64)
  if ranking == "rms":
    return np.sqrt(np.asarray(sumsq, np.float64) / max(count, 1))
  raise ValueError(f"ranking must be 'absmax' or 'rms', got {ranking!r}")


def num_int8_blocks(scores: np.ndarray, num_blocks: int, block_size: int, acts: ActivationQuantConfig) -> int:
  """INT8 block count: floor(int8_fraction * blocks), fewer when outlier_ratio says fewer are needed."""
  cap = int(math.floor(acts.int8_fraction * num_blocks + 1e-9))
  if acts.outlier_ratio is None or cap == 0:
    return cap
  median = float(np.median(scores[scores > 0])) if np.any(scores > 0) else 0.0
  outliers = int(np.sum(scores > acts.outlier_ratio * median))
  return min(cap, -(-outliers // block_size))


def plan_activation(layer_name: str, plan: InputPlan, acts: ActivationQuantConfig, stats=None) -> ActivationPlan:
  """The permutation and mixed-precision format of one layer (stats: `calib.stats.LayerStats`)."""
  kp, block = plan.padded_features, plan.block_size
  num_blocks = kp // block
  if acts.bits == 8:
    return ActivationPlan(None, ActivationFormat(block, num_blocks, num_blocks, acts.scale_span))
  if not acts.mixed:
    return ActivationPlan(None, ActivationFormat(block, 0, num_blocks, acts.scale_span))
  if stats is None:
    raise ValueError(f"stats are missing for layer {layer_name!r}: FMPQ (int8_fraction="
                     f"{acts.int8_fraction}) ranks channels on calibration statistics; collect them with "
                     "calib.stats.collect_stats(model, config, windows)")
  if stats.absmax.shape != (kp,):
    raise ValueError(f"stats for layer {layer_name!r} cover {stats.absmax.shape[0]} channels, the layer's "
                     f"transformed input has {kp} (stats collected with another config?)")
  scores = channel_scores(stats.absmax, stats.sumsq, stats.count, acts.ranking)
  scores = np.where(np.arange(kp) < plan.in_features if not plan.online_rotation else True, scores, -np.inf)
  n8 = num_int8_blocks(scores[np.isfinite(scores)], num_blocks, block, acts)
  if n8 == 0:
    return ActivationPlan(None, ActivationFormat(block, 0, num_blocks, acts.scale_span))
  unit = acts.permute_unit
  if block % unit or kp % unit:
    raise ValueError(f"layer {layer_name!r}: activations.permute_unit={unit} must divide the block size {block} "
                     f"and the padded input size {kp}")
  unit_scores = scores.reshape(kp // unit, unit).max(axis=1)  # a run ranks by its largest channel
  units = np.sort(np.argsort(-unit_scores, kind="stable")[:n8 * block // unit])
  top = (units[:, None] * unit + np.arange(unit)).reshape(-1)  # ascending: each run keeps its channel order
  rest = np.setdiff1d(np.arange(kp), top)  # ascending: real channels first, padding last
  perm = np.concatenate([top, rest]).astype(np.int32)
  return ActivationPlan(perm, ActivationFormat(block, n8, num_blocks, acts.scale_span))
