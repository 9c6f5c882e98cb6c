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
from cometjax.core.formats import (ActivationFormat, InputTransformWeight, QuantizedWeight, pack_zero_points,
                                   with_activation)
from cometjax.core.numerics import pack_int4
from cometjax.quant import clipping, gptq
from cometjax.quant.config import QuantConfig
from cometjax.quant.fmpq import InputPlan, input_plan, plan_activation

MAX_REGION_CHUNK = 1024
MAX_PALEY_FACTOR = 72  # the dense factor of a Kronecker Hadamard (m x m per 2**a channels) stays small


def _fast_hadamard_order(n: int) -> bool:
  return rotations.hadamard_exists(n) and rotations.hadamard_factors(n)[1] <= MAX_PALEY_FACTOR


def int4_rotation(fmt: ActivationFormat, kind: str, seed: int = 2) -> rotations.HadamardRotation | None:
  """The online rotation of the INT4 channels of `fmt` ("region" or "block"; None when there is nothing to
  rotate): signed Hadamard blocks, applied by a fast transform, only the signs stored.

  "block": one Hadamard block per FMPQ block (the block size needs a Hadamard order). "region": the largest
  chunk b <= MAX_REGION_CHUNK dividing K4 that has a fast Hadamard order (a power of two times a Paley
  factor of at most MAX_PALEY_FACTOR): one chunk over the whole region where K4 has one (48, 144), else
  block-diagonal chunks (K4 = 448: seven of 64).
  """
  k4 = fmt.int4_channels
  if not k4 or not kind:
    return None
  if kind == "block":
    if not rotations.hadamard_exists(fmt.block_size):
      raise ValueError(f"rotate_int4='block' needs a Hadamard matrix of the block size {fmt.block_size}; none is "
                       "built here (use a power of two, or rotate_int4='region')")
    block = fmt.block_size
  else:
    block = next(c for c in range(min(k4, MAX_REGION_CHUNK), 0, -1) if k4 % c == 0 and _fast_hadamard_order(c))
  return rotations.HadamardRotation.create(k4, block, seed)


def _embed(start: int, matrix: np.ndarray) -> np.ndarray:
  """blockdiag(I_start, matrix)."""
  out = np.eye(start + matrix.shape[0])
  out[start:, start:] = matrix
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


def _stored(a, dtype: str):
  """a as the dtype it is stored in (f32 values of a rounded to f16 / bf16)."""
  return None if a is None else jnp.asarray(a, jnp.float32).astype(dtype)


def _weight_codes(problem: _Problem, config: QuantConfig, fmt: ActivationFormat | None):
  """(int8 codes [Kp, N], scales [G, N], zeros [G, N] or None) of the final weight, scales and zeros in the
  stored dtype (the codes are picked against the stored values)."""
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
    ratios = clipping.mse_clip_ratios(wj, wcfg.bits, wcfg.group_size, wcfg.mse_grid, row_weights=row_weights,
                                      symmetric=wcfg.symmetric, integer_zero=wcfg.integer_zero)
  if method == "clip":
    ratios = clipping.learn_clip_ratios(wj, problem.samples, wcfg.bits, wcfg.group_size, fmt,
                                        steps=wcfg.clip_steps, learning_rate=wcfg.clip_learning_rate,
                                        init_ratios=ratios)
  scales, zeros = clipping.grid_from_ratios(wj, ratios, wcfg.bits, wcfg.group_size, wcfg.symmetric,
                                            wcfg.integer_zero)
  scales = _stored(scales, wcfg.scale_dtype)
  zeros = _stored(zeros, "float32" if wcfg.integer_zero else wcfg.scale_dtype)
  scales32 = np.asarray(scales, np.float32)
  zeros32 = None if zeros is None else np.asarray(zeros, np.float32)
  if method == "gptq":
    codes = gptq.gptq_codes(w, hessian, scales32, wcfg.bits, damp=wcfg.gptq_damp, act_order=wcfg.gptq_act_order,
                            zeros=zeros32)
  else:
    codes = np.asarray(clipping.quantize_codes(wj, jnp.asarray(scales32), wcfg.bits,
                                               None if zeros32 is None else jnp.asarray(zeros32)))
  return codes, scales, zeros


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
  online = plan.rotation()
  perm = None if act_plan is None else act_plan.perm
  # the INT4 rotation where the layer has INT4 channels (with INT8 blocks, or "block": all INT4 also gains)
  wants_rotation = acts is not None and acts.rotate_int4 and fmt.num_int4_blocks and (
      fmt.num_int8_blocks or acts.rotate_int4 == "block")
  region_rotation = int4_rotation(fmt, acts.rotate_int4) if wants_rotation else None
  region = None if region_rotation is None else _embed(fmt.int8_channels, region_rotation.matrix())
  if online is not None:
    w = online.matrix().T @ w  # the statistics were collected on the padded, online-rotated input already
  problem = _Problem(w, None if layer_stats is None else layer_stats.hessian,
                     None if layer_stats is None else layer_stats.samples)
  problem = _transform(_transform(problem, perm=perm), matrix=region)
  codes, scales, zeros = _weight_codes(problem, config, fmt)
  data = pack_int4(jnp.asarray(codes), axis=0) if wcfg.bits == 4 else jnp.asarray(codes, jnp.int8)
  # with a region rotation the permutation must run before it, outside the kernel's fused permute
  inner_perm = None if region is not None else perm
  inner = with_activation(QuantizedWeight(
      data=data, scales=scales, perm=None if inner_perm is None else jnp.asarray(inner_perm, jnp.int32),
      bits=wcfg.bits, group_size=wcfg.group_size, shape=(kp, n),
      zeros=pack_zero_points(zeros) if wcfg.integer_zero else zeros), fmt)
  inner.check_arrays()
  outer_perm = None if region is None else perm
  if kp == k and online is None and region is None:
    return inner
  return InputTransformWeight(
      inner=inner, rotation=online, in_features=k,
      perm=None if outer_perm is None else jnp.asarray(outer_perm, jnp.int32), region=region_rotation,
      region_start=0 if region is None else fmt.int8_channels)
