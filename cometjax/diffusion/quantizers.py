"""The quantizer modules QuEST attaches to the diffusion models (`cometjax.diffusion.attach`).

Every quantized layer has two executions that agree to rounding:
  - "fake": simulated quantization in float with straight-through rounding (calibration and finetuning;
    gradients reach weights, step sizes and AdaRound variables);
  - "integer": packed INT4/INT8 weights and integer activations through `cometjax.ops.linear`. With static
    ("tensor") activations the leaf is `StaticActQuantWeight` (int8 x int8 -> int32, the float scales once in
    the epilogue); with "token" activations it is the LLM path's `QuantizedWeight` (wrapped in an
    `InputTransformWeight` when the input is zero-padded or rotated), multiplied by the W4Ax GEMM.
Rounding is round-half-up (`cometjax.core.numerics.round_half_up`) in both, as in every other quantizer.

`LinearQuantizer` and `MatmulQuantizer` implement the interceptor protocol of `cometjax.models.layers`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax import ops
from cometjax.core import rotations
from cometjax.core.formats import (ActivationFormat, InputTransformWeight, QuantizedWeight, StaticActQuantWeight,
                                   pack_static_weight)
from cometjax.core.numerics import quantize_static, quantize_symmetric, round_half_up, signed_range
from cometjax.diffusion.config import ACT_GRANULARITIES

MAX_ROTATION_BLOCK = 256  # the largest dense rotation a layer runs per token
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


class QuantParam(nnx.Param):
  """Learnable quantization parameter: activation step sizes / zero points, weight scales."""


class AdaRoundParam(nnx.Param):
  """AdaRound's continuous rounding variable V (soft rounding h(V) in [0, 1])."""


class IntegerState(nnx.Variable):
  """Frozen arrays, never trained: a converted layer's integer weights, an input rotation."""


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  return jnp.clip(jax.nn.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


def round_ste(x: jax.Array) -> jax.Array:
  """Round half up with a straight-through (identity) gradient."""
  return x + jax.lax.stop_gradient(round_half_up(x) - x)


def fake_static_codes(x: jax.Array, step: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """q - round(zero) of `quantize_static` as an integer-valued float with LSQ-style straight-through
  gradients: x ~ step * codes."""
  qmin, qmax = signed_range(bits)
  zero = round_ste(zero)
  return jnp.clip(round_ste(x / step) + zero, qmin, qmax) - zero


def integer_act_matmul(a_int: jax.Array, a_step, a_zero, b_int: jax.Array, b_step, b_zero) -> jax.Array:
  """(a_step (a_int - a_zero)) @ (b_step (b_int - b_zero)) with an int32 accumulator.

  a_int: int8 [..., M, K]; b_int: int8 [..., K, N].
  """
  a_zero = round_half_up(a_zero).astype(jnp.int32)
  b_zero = round_half_up(b_zero).astype(jnp.int32)
  depth = a_int.shape[-1]
  accumulator = jnp.matmul(a_int, b_int, preferred_element_type=jnp.int32)
  accumulator = (accumulator - a_zero * b_int.astype(jnp.int32).sum(-2, keepdims=True)
                 - b_zero * a_int.astype(jnp.int32).sum(-1, keepdims=True) + a_zero * b_zero * depth)
  return accumulator.astype(jnp.float32) * (a_step * b_step)


def token_act_leaf(data: jax.Array, weight_scale: jax.Array, *, in_features: int, weight_bits: int, act_bits: int,
                   group_size: int | None):
  """A W4Ax GEMM leaf from `pack_static_weight`'s weight storage (`data`: packed uint8 [ceil(K/2), N] for 4
  bit, int8 [K, N] for 8 bit) and scales ([K // group_size, N] or [N]).

  The activation format is one region: all INT4 (act_bits <= 4) or all INT8, one scale per token. When K is
  odd the leaf is wrapped in an `InputTransformWeight` that zero-pads the input to the packed even K (zero
  channels leave every per-token scale and every product unchanged).
  """
  check_token_bits(weight_bits, act_bits)
  out_features = data.shape[-1]
  padded = in_features + in_features % 2
  if weight_bits == 8 and padded != data.shape[0]:
    data = jnp.pad(data, ((0, padded - data.shape[0]), (0, 0)))
  fmt = ActivationFormat(padded, 1 if act_bits == 8 else 0, 1)
  leaf = QuantizedWeight(data=data, scales=weight_scale.reshape(-1, out_features).astype(jnp.float32), perm=None,
                         bits=weight_bits, group_size=group_size, shape=(padded, out_features), activation=fmt)
  return leaf if padded == in_features else InputTransformWeight(inner=leaf, rotation=None, in_features=in_features)


def check_token_bits(weight_bits: int, act_bits: int) -> None:
  if act_bits not in (4, 8):
    raise ValueError(f"per-token activations run through the W4Ax GEMM: act_bits must be 4 or 8, got {act_bits}")
  if weight_bits not in (4, 8):
    raise ValueError(f"per-token activations run through the W4Ax GEMM: weight_bits must be 4 or 8, got "
                     f"{weight_bits}")


def rotation_blocks(in_features: int, seed: int = 0) -> np.ndarray | None:
  """The online input rotation of a layer with K = `in_features` inputs: f32 [K // b, b, b] (every block the
  same randomized Hadamard matrix), or None when K is odd.

  b = K when a Hadamard matrix of order K is built here and K <= MAX_ROTATION_BLOCK, else the largest
  power of two <= MAX_ROTATION_BLOCK that divides K (e.g. a 7x7 conv on 16 channels, K = 784: b = 16).
  """
  if rotations.hadamard_exists(in_features) and in_features <= MAX_ROTATION_BLOCK:
    block = in_features
  else:
    block = 1
    while in_features % (2 * block) == 0 and 2 * block <= MAX_ROTATION_BLOCK:
      block *= 2
  if block < 2:
    return None
  # x @ diag(s) H: the signs flip input channels before H mixes them.  H diag(s) would leave a
  # non-negative input (after a ReLU) with its whole mean in one output channel, an outlier it created.
  matrix = rotations.random_hadamard(block, seed).T.astype(np.float32)
  return np.ascontiguousarray(np.broadcast_to(matrix, (in_features // block, block, block)))


class ActQuantizer(nnx.Module):
  """Static asymmetric activation quantizer with one (step, zero) per timestep group."""

  def __init__(self, bits: int, num_groups: int):
    self.bits = bits
    self.step = QuantParam(jnp.ones((num_groups,), jnp.float32))  # [G]
    self.zero = QuantParam(jnp.zeros((num_groups,), jnp.float32))  # [G]
    self.calibrated = False

  def params_for(self, group, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(step, zero) of `group`: a scalar, or int [B] (one group per sample, broadcast over x)."""
    step, zero = self.step[...][group], self.zero[...][group]
    if jnp.ndim(group) == 1:
      shape = (-1,) + (1,) * (x.ndim - 1)
      step, zero = step.reshape(shape), zero.reshape(shape)
    return step, zero

  def __call__(self, x: jax.Array, group) -> jax.Array:
    """Float simulation of `quantize_static` with LSQ-style straight-through gradients."""
    step, zero = self.params_for(group, x)
    return fake_static_codes(x, step, zero, self.bits) * step

  def centered_codes(self, x: jax.Array, group) -> tuple[jax.Array, jax.Array]:
    """(`fake_static_codes` with this group's step and zero point, step): x ~ step * codes."""
    step, zero = self.params_for(group, x)
    return fake_static_codes(x, step, zero, self.bits), step

  def quantize_int(self, x: jax.Array, group) -> tuple[jax.Array, jax.Array, jax.Array]:
    step, zero = self.params_for(group, x)
    return quantize_static(x, step, zero, self.bits), step, zero

  def set_range(self, group: int, low: float, high: float):
    """Step and zero point so [low, high] maps onto the integer range (low <= 0 <= high enforced)."""
    qmin, qmax = signed_range(self.bits)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    step = max((high - low) / (qmax - qmin), 1e-8)
    self.step[...] = self.step[...].at[group].set(step)
    self.zero[...] = self.zero[...].at[group].set(float(np.floor(qmin - low / step + 0.5)))


class TokenActQuantizer(nnx.Module):
  """Dynamic symmetric per-token activation quantizer (the W4Ax GEMM's): scale = max|x| / qmax per token.

  Nothing to calibrate or learn; the timestep group is ignored.  The codes match
  `cometjax.pallas.quantize_act.quantize_act_reference` for a single-region format.
  """

  def __init__(self, bits: int):
    self.bits = bits

  def __call__(self, x: jax.Array, group=None) -> jax.Array:  # [..., K]
    codes, scale = quantize_symmetric(jax.lax.stop_gradient(x), self.bits, axis=-1)  # [..., K], [..., 1]
    scaled = x / scale
    return (scaled + jax.lax.stop_gradient(codes - scaled)) * scale  # straight-through rounding


def best_weight_scale(kernel: jax.Array, bits: int, group_size: int | None = None,
                      ratios=np.linspace(0.5, 1.0, 11)) -> jax.Array:
  """Scale per output channel ([N]) or per (input group, output channel) ([K // group_size, N])
  minimising the rounding MSE over a few clipping ratios."""
  qmin, qmax = signed_range(bits)
  k, n = kernel.shape
  grouped = kernel.reshape(k // (group_size or k), group_size or k, n)  # [G, g, N]
  absmax = jnp.maximum(jnp.abs(grouped).max(1), 1e-8)  # [G, N]
  best_scale, best_error = absmax / qmax, jnp.full(absmax.shape, jnp.inf)
  for ratio in ratios:
    scale = absmax * ratio / qmax
    error = ((jnp.clip(round_half_up(grouped / scale[:, None]), qmin, qmax) * scale[:, None] - grouped) ** 2).sum(1)
    better = error < best_error
    best_scale = jnp.where(better, scale, best_scale)
    best_error = jnp.where(better, error, best_error)
  return (best_scale[0] if group_size is None else best_scale).astype(jnp.float32)


class WeightQuantizer(nnx.Module):
  """Symmetric weight quantizer, one scale per output channel or per (input group, output channel);
  rounding "nearest" (STE) or "adaround"."""

  def __init__(self, kernel: jax.Array, bits: int, group_size: int | None = None):  # kernel: [K, N]
    if group_size is not None and kernel.shape[0] % group_size:
      raise ValueError(f"group_size={group_size} must divide the kernel's input width {kernel.shape[0]}")
    self.bits = bits
    self.group_size = group_size
    self.scale = QuantParam(best_weight_scale(kernel, bits, group_size))  # [N] or [K // group_size, N]
    self.rounding = "nearest"
    self.soft = True
    self.adaround_v = nnx.data(None)

  def full_scale(self) -> jax.Array:  # [N] or [K, N]: broadcasts against the kernel
    if self.group_size is None:
      return self.scale[...]
    return jnp.repeat(self.scale[...], self.group_size, axis=0)

  def integer_values(self, kernel: jax.Array) -> jax.Array:  # [K, N], integer-valued float
    qmin, qmax = signed_range(self.bits)
    scaled = kernel / self.full_scale()
    if self.rounding == "adaround":
      v = self.adaround_v[...]
      offset = rectified_sigmoid(v) if self.soft else (v >= 0).astype(kernel.dtype)
      return jnp.clip(jax.lax.stop_gradient(jnp.floor(scaled)) + offset, qmin, qmax)
    return jnp.clip(round_ste(scaled), qmin, qmax)

  def __call__(self, kernel: jax.Array) -> jax.Array:
    return self.integer_values(kernel) * self.full_scale()

  def start_adaround(self, kernel: jax.Array):
    """Initialise V so that the soft rounding reproduces the float weight (AdaRound's init)."""
    scaled = kernel / self.full_scale()
    rest = scaled - jnp.floor(scaled)
    p = jnp.clip((rest - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA), 1e-4, 1 - 1e-4)
    self.adaround_v = AdaRoundParam(jnp.log(p / (1 - p)))
    self.rounding, self.soft = "adaround", True

  def finish_adaround(self, kernel_variable: nnx.Param):
    """Fold the hard rounding into the kernel (kernel := scale * q) and return to nearest rounding.

    Later finetuning then starts exactly at the AdaRound solution. (Folding to W + scale (h - 1/2), off the
    grid, broke the bitwise agreement of fake and integer execution in rotated per-token layers; README Owed.)
    """
    self.soft = False
    kernel_variable[...] = self(kernel_variable[...])
    self.rounding, self.adaround_v = "nearest", nnx.data(None)


class LinearQuantizer(nnx.Module):
  """Quantizer of one linear (or im2col conv) layer: input activations + weights (the
  `cometjax.models.layers` LinearInterceptor)."""

  def __init__(self, kernel: jax.Array, weight_bits: int, act_bits: int | None, num_groups: int,
               act_granularity: str = "tensor", weight_group_size: int | None = None,
               rotation: np.ndarray | None = None):
    """kernel [K, N]: the kernel the weight quantizer sees (already R^T W when `rotation` is given);
    rotation: `rotation_blocks` output, applied to the input before it is quantized."""
    if act_granularity not in ACT_GRANULARITIES:
      raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {act_granularity!r}")
    if rotation is not None and (act_granularity != "token" or act_bits is None):
      raise ValueError("an input rotation needs per-token activations (act_granularity='token', act_bits set)")
    self.rotation = nnx.data(None) if rotation is None else IntegerState(jnp.asarray(rotation, jnp.float32))
    self.weight = WeightQuantizer(kernel, weight_bits, weight_group_size)
    if act_bits is None:
      self.act = nnx.data(None)
    elif act_granularity == "token":
      self.act = TokenActQuantizer(act_bits)
    else:
      self.act = ActQuantizer(act_bits, num_groups)
    self.execution = "fake"
    self.integer_data = nnx.data(None)
    self.column_sums = nnx.data(None)

  @property
  def per_token(self) -> bool:
    return isinstance(self.act, TokenActQuantizer)

  @property
  def rotates_input(self) -> bool:
    return self.rotation is not None

  @property
  def runs_as_matmul(self) -> bool:
    return self.execution == "integer" or self.per_token

  def float_input(self, x: jax.Array) -> jax.Array:
    if self.rotation is None:
      return x
    return rotations.apply_block_rotation(x, self.rotation[...])

  def quantize_input(self, x: jax.Array, group) -> jax.Array:
    return x if self.act is None else self.act(x, group)

  def quantize_kernel(self, kernel: jax.Array) -> jax.Array:
    return self.weight(kernel)

  def linear(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None, group) -> jax.Array:
    """The quantized x @ kernel + bias (x [..., K]) in this layer's execution."""
    if self.execution == "integer":
      return ops.linear(x, self.integer_leaf(group), bias)
    return ops.linear(self.quantize_input(self.float_input(x), group), self.weight(kernel), bias)

  def to_integer(self, kernel: jax.Array):
    """Switches to integer execution: the kernel's codes are packed once (the float kernel stays)."""
    if self.act is None:
      raise ValueError("integer execution needs an activation quantizer (act_bits is None)")
    if self.weight.group_size is not None and not self.per_token:
      raise ValueError("grouped weight scales run only with per-token activations (act_granularity='token')")
    if self.per_token:
      check_token_bits(self.weight.bits, self.act.bits)
    leaf = pack_static_weight(self.weight.integer_values(kernel), self.weight.scale[...], 0.0, 0.0,
                              weight_bits=self.weight.bits, act_bits=self.act.bits)
    self.integer_data = IntegerState(leaf.data)
    if not self.per_token:  # the zero-point term of static activations
      self.column_sums = IntegerState(leaf.column_sums)
    self.in_features = kernel.shape[0]
    self.execution = "integer"

  def integer_leaf(self, group):
    """The layer's integer weight leaf for `ops.linear` (group: timestep group, for static scales)."""
    if self.per_token:
      leaf = token_act_leaf(self.integer_data[...], self.weight.scale[...], in_features=self.in_features,
                            weight_bits=self.weight.bits, act_bits=self.act.bits, group_size=self.weight.group_size)
      if self.rotation is None:
        return leaf
      return InputTransformWeight(inner=leaf, rotation=None, in_features=self.in_features, region=self.rotation[...])
    return StaticActQuantWeight(
        data=self.integer_data[...], weight_scale=self.weight.scale[...].reshape(1, -1),
        column_sums=self.column_sums[...], act_step=self.act.step[...][group],
        act_zero=self.act.zero[...][group], in_features=self.in_features, weight_bits=self.weight.bits,
        act_bits=self.act.bits)


class MatmulQuantizer(nnx.Module):
  """Quantizer of an activation x activation matmul (attention q@k^T and p@v)."""

  def __init__(self, lhs_bits: int, rhs_bits: int, num_groups: int):
    self.lhs = ActQuantizer(lhs_bits, num_groups)
    self.rhs = ActQuantizer(rhs_bits, num_groups)
    self.execution = "fake"

  def __call__(self, a: jax.Array, b: jax.Array, group) -> jax.Array:  # a [..., M, K], b [..., K, N]
    if self.execution == "integer":
      a_int, a_step, a_zero = self.lhs.quantize_int(a, group)
      b_int, b_step, b_zero = self.rhs.quantize_int(b, group)
      return integer_act_matmul(a_int, a_step, a_zero, b_int, b_step, b_zero)
    # Same arithmetic as the integer path: the integer-valued codes multiply exactly in f32 (|sum| < 2**24),
    # then one scale.  A float product of the dequantized operands would differ by an ulp, and the
    # result sits on a lattice, so a per-token quantizer downstream would round its exact ties the other way.
    a_codes, a_step = self.lhs.centered_codes(a, group)
    b_codes, b_step = self.rhs.centered_codes(b, group)
    return jnp.matmul(a_codes, b_codes) * (a_step * b_step)
