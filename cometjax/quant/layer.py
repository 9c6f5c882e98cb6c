"""One linear layer: a float kernel [K, N] (+ its calibration statistics) -> its quantized leaf.

The layer's input reaches the integer matmul as x_final = x_padded @ T with T = (online rotation) then
(FMPQ permutation) then (INT4-region rotation), each optional (`cometjax.quant.fmpq`); the weight becomes
T^T W. The calibration statistics arrive in the padded, online-rotated space (`calib.stats`) and move
through the permutation and the region rotation before the weight method (round-to-nearest, MSE or learned
clipping, GPTQ) picks integer codes and scales.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from cometjax.core import rotations
from cometjax.core.formats import ActivationFormat, InputTransformWeight, QuantizedWeight
from cometjax.core.numerics import pack_int4
from cometjax.quant import clipping, gptq
from cometjax.quant.config import QuantConfig
from cometjax.quant.fmpq import InputPlan, input_plan, plan_activation

MAX_REGION_CHUNK = 1024


def int4_region_blocks(fmt: ActivationFormat, seed: int = 2) -> np.ndarray:
  """Orthogonal chunks [num_chunks, b, b] rotating the INT4 region (K4 channels) of `fmt`.

  One chunk over the whole region when K4 <= MAX_REGION_CHUNK (randomized Hadamard when one of order K4
  exists, else a random orthogonal matrix); larger regions use the largest Hadamard order b <= 1024
  dividing K4 (the block size always qualifies for power-of-two blocks), the same matrix in every chunk.
  """
  k4 = fmt.int4_channels
  if k4 <= MAX_REGION_CHUNK:
    return rotations.orthogonal(k4, seed)[None]
  b = next(c for c in range(MAX_REGION_CHUNK, 1, -1)
           if k4 % c == 0 and (rotations.hadamard_exists(c) or c == fmt.block_size))
  return np.broadcast_to(rotations.orthogonal(b, seed), (k4 // b, b, b)).copy()


def _block_diagonal(start: int, blocks: np.ndarray) -> np.ndarray:
  chunks, b, _ = blocks.shape
  out = np.eye(start + chunks * b)
  for c in range(chunks):
    lo = start + c * b
    out[lo:lo + b, lo:lo + b] = blocks[c]
  return out


@dataclasses.dataclass
class _Problem:
  """The weight and its calibration data in the space of x_final (module docstring)."""
  w: np.ndarray  # f64 [Kp, N]
  hessian: np.ndarray | None  # [Kp, Kp]
  samples: np.ndarray | None  # [S, Kp]


def _transform(problem: _Problem, matrix: np.ndarray | None = None, perm: np.ndarray | None = None) -> _Problem:
  """x_final = x @ matrix, or x[..., perm]: W <- matrix^T W (W[perm]); H, samples move along."""
  w, h, s = problem.w, problem.hessian, problem.samples
  if matrix is not None:
    w = matrix.T @ w
    h = None if h is None else matrix.T @ h @ matrix
    s = None if s is None else s @ matrix
  if perm is not None:
    w = w[perm]
    h = None if h is None else h[perm][:, perm]
    s = None if s is None else s[:, perm]
  return _Problem(w, h, s)


def _weight_codes(problem: _Problem, config: QuantConfig, fmt: ActivationFormat | None):
  """(int8 codes [Kp, N], f32 scales [G, N]) of the final weight."""
  wcfg = config.weights
  method = wcfg.method
  w, hessian = problem.w, problem.hessian
  if method == "gptq" and wcfg.gptq_act_aware and fmt is not None:
    w, hessian = _activation_aware_target(w, problem.samples, fmt, wcfg.gptq_damp)
  wj = jnp.asarray(w, jnp.float32)
  k, n = w.shape
  g = 1 if wcfg.group_size is None else k // wcfg.group_size
  if method == "rtn":
    ratios = jnp.ones((g, n), jnp.float32)
  else:
    row_weights = None if hessian is None else np.maximum(np.diag(hessian), 0) + 1e-8
    ratios = clipping.mse_clip_ratios(wj, wcfg.bits, wcfg.group_size, wcfg.mse_grid, row_weights=row_weights)
  if method == "clip":
    ratios = clipping.learn_clip_ratios(wj, problem.samples, wcfg.bits, wcfg.group_size, fmt,
                                        steps=wcfg.clip_steps, learning_rate=wcfg.clip_learning_rate,
                                        init_ratios=ratios)
  scales = clipping.scales_from_ratios(wj, ratios, wcfg.bits, wcfg.group_size)
  if method == "gptq":
    codes = gptq.gptq_codes(w, hessian, np.asarray(scales), wcfg.bits, damp=wcfg.gptq_damp,
                            act_order=wcfg.gptq_act_order)
  else:
    codes = np.asarray(clipping.quantize_codes(wj, scales, wcfg.bits))
  return codes, np.asarray(scales, np.float32)


def _activation_aware_target(w: np.ndarray, samples: np.ndarray, fmt: ActivationFormat, damp: float):
  """(W*, H_q) for GPTQ against quantized activations: W* = argmin ||X W - Q(X) W*|| (ridge-damped) and
  H_q = Q(X)^T Q(X), on the sampled calibration rows X [S, Kp] (the runtime input is Q(X), not X)."""
  x = np.asarray(samples, np.float64)
  xq = np.asarray(clipping.fake_quantize_fmpq(jnp.asarray(samples, jnp.float32), fmt), np.float64)
  hq = xq.T @ xq
  ridge = hq + damp * np.mean(np.diag(hq)) * np.eye(hq.shape[0])
  target = np.linalg.solve(ridge, xq.T @ (x @ w))
  return target, hq


def _check_stats(name: str, config: QuantConfig, layer_stats) -> None:
  wcfg, acts = config.weights, config.activations
  if wcfg.method in ("clip", "gptq") and layer_stats is None:
    raise ValueError(f"stats are missing for layer {name!r}: weights.method={wcfg.method!r} needs calibration "
                     "statistics (calib.stats.collect_stats)")
  if wcfg.method == "gptq" and layer_stats.hessian is None:
    raise ValueError(f"stats for layer {name!r} have no Hessian; weights.method='gptq' needs "
                     "collect_stats(..., hessian=True)")
  if (wcfg.method == "clip" or (wcfg.method == "gptq" and wcfg.gptq_act_aware and acts is not None)) and \
      layer_stats.samples is None:
    raise ValueError(f"stats for layer {name!r} have no activation samples; weights.method={wcfg.method!r} "
                     "needs collect_stats(..., max_samples=N)")


def quantize_layer(name: str, kernel, config: QuantConfig, layer_stats=None):
  """One float kernel [K, N] -> QuantizedWeight or InputTransformWeight (see the module docstring)."""
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 2:
    raise ValueError(f"layer {name!r}: kernel must be 2-D [in, out], got shape {kernel.shape}")
  if not np.all(np.isfinite(kernel)):
    raise ValueError(f"layer {name!r}: kernel holds NaN/Inf values")
  k, n = kernel.shape
  wcfg, acts = config.weights, config.activations
  plan: InputPlan = input_plan(name, k, config)
  act_plan = None if acts is None else plan_activation(name, plan, acts, layer_stats)
  fmt = None if act_plan is None else act_plan.format
  _check_stats(name, config, layer_stats)
  kp = plan.padded_features
  w = np.zeros((kp, n))
  w[:k] = kernel
  online = plan.rotation_matrix()
  perm = None if act_plan is None else act_plan.perm
  region_blocks = (int4_region_blocks(fmt) if acts is not None and acts.rotate_int4 and fmt.num_int4_blocks
                   and fmt.num_int8_blocks else None)
  region = None if region_blocks is None else _block_diagonal(fmt.int8_channels, region_blocks)
  if online is not None:
    w = online.T @ w  # the statistics were collected on the padded, online-rotated input already
  problem = _Problem(w, None if layer_stats is None else layer_stats.hessian,
                     None if layer_stats is None else layer_stats.samples)
  problem = _transform(_transform(problem, perm=perm), matrix=region)
  codes, scales = _weight_codes(problem, config, fmt)
  data = pack_int4(jnp.asarray(codes), axis=0) if wcfg.bits == 4 else jnp.asarray(codes, jnp.int8)
  # with a region rotation the permutation must run before it, outside the kernel's fused permute
  inner_perm = None if region is not None else perm
  inner = QuantizedWeight(data=data, scales=jnp.asarray(scales),
                          perm=None if inner_perm is None else jnp.asarray(inner_perm, jnp.int32),
                          bits=wcfg.bits, group_size=wcfg.group_size, shape=(kp, n), activation=fmt)
  inner.check_arrays()
  outer_perm = None if region is None else perm
  if kp == k and online is None and region is None:
    return inner
  return InputTransformWeight(
      inner=inner, rotation=None if online is None else jnp.asarray(online, jnp.float32), in_features=k,
      perm=None if outer_perm is None else jnp.asarray(outer_perm, jnp.int32),
      region=None if region_blocks is None else jnp.asarray(region_blocks, jnp.float32),
      region_start=0 if region is None else fmt.int8_channels)
