"""Quantized layers for diffusion models (QuEST / Q-Diffusion style).

Weights: INT4 (or INT8) symmetric, one scale per output channel (or per group of `weight_group_size`
input channels), rounding either to nearest or learned with AdaRound. Activations, by
`act_granularity`:
  - "tensor" (Q-Diffusion / QuEST): asymmetric (step + zero point), *static* step sizes learned per
    timestep group, so a sampler switches scales by timestep;
  - "token": symmetric, one scale per token computed at run time (max |x| / qmax), the format of the W4Ax
    GEMM (`cometjax.qtypes.QuantizedActivation` with a single INT4 or INT8 region).
Softmax outputs and the inputs of the first and last layer run at 8 bit.
With `rotation="hadamard"` (token mode) each quantized linear's input is multiplied by a randomized
Hadamard matrix R (block-diagonal where no Hadamard matrix of order K is built) before it is quantized,
and the stored kernel becomes R^T W at attach time, so the float function is unchanged (QuaRot's online
rotation): outlier channels are spread over the block, which per-token scales need.

Every quantized layer has two executions that agree to rounding:
  - "fake": simulated quantization in float with straight-through rounding (used for calibration and
    finetuning; gradients reach weights, step sizes and AdaRound variables);
  - "integer": the real thing. Weights are packed INT4 (uint8 [K//2, N], low nibble first along K, with
    `cometjax.qtypes.pack_int4`), activations are rounded to int8 with the static step, the matmul is
    `int8 x int8 -> int32` and the float scales are applied once in the epilogue. The leaf type is
    `StaticActQuantWeight`, which `cometjax.ops.linear` dispatches to through `quantized_matmul`.
    With "token" activations the leaf is the LLM path's `qtypes.QuantizedWeight` (wrapped in a
    `quantize.InputTransformWeight` when the input is zero-padded or rotated): activations are quantized
    per token and multiplied by the W4Ax GEMM (`cometjax.pallas.w4ax_matmul`: Pallas on GPU or in interpret mode,
    its jnp reference on CPU).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax import ops, qtypes
from cometjax.quantize import InputTransformWeight, apply_block_rotation

EXECUTIONS = ("fake", "integer")
ACT_GRANULARITIES = ("tensor", "token")
ROTATIONS = (None, "hadamard")
MAX_ROTATION_BLOCK = 256  # the largest dense rotation a layer runs per token


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class DiffusionQuantConfig:
  """How a diffusion model is quantized.  `act_bits=None` keeps activations in float."""

  weight_bits: int = 4
  act_bits: int | None = 4
  edge_act_bits: int = 8  # inputs of the first and last layer
  edge_weight_bits: int = 8  # weights of the first and last layer (BRECQ / Q-Diffusion convention)
  softmax_bits: int = 8  # attention probabilities
  num_timestep_groups: int = 4
  num_timesteps: int = 1000
  quantize_attention_matmuls: bool = True
  # Layers (path regexes, matched against "a.b.0.c") that stay in float entirely.
  keep_float: tuple[str, ...] = ()
  # (path regex, bits): input activation bits of the matching layers (first match wins), e.g. the
  # conditioning path of a DiT, which runs once per sample rather than once per token.
  act_bits_overrides: tuple[tuple[str, int], ...] = ()
  # "tensor": static per-tensor scales per timestep group; "token": dynamic per-token scales (module doc).
  act_granularity: str = "tensor"
  # Input channels per weight scale (None: one scale per output channel); layers whose input width it
  # does not divide keep per-output-channel scales.  Needs act_granularity="token" (the W4Ax GEMM path).
  weight_group_size: int | None = None
  # None, or "hadamard": rotate every quantized linear's input online (module doc).  Needs "token".
  rotation: str | None = None

  def __post_init__(self):
    if self.weight_bits not in (2, 3, 4, 8):
      raise ValueError(f"weight_bits must be one of 2, 3, 4, 8, got {self.weight_bits}")
    for name in ("act_bits", "edge_act_bits", "softmax_bits"):
      bits = getattr(self, name)
      if bits is not None and not 2 <= bits <= 8:
        raise ValueError(f"{name} must be in 2..8 (int8 carries the integer activations), got {bits}")
    if self.num_timestep_groups < 1:
      raise ValueError(f"num_timestep_groups must be >= 1, got {self.num_timestep_groups}")
    for entry in self.act_bits_overrides:
      if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], str)
          or not isinstance(entry[1], int) or not 2 <= entry[1] <= 8):
        raise ValueError(f"act_bits_overrides entries must be (path regex, bits in 2..8), got {entry!r}")
      re.compile(entry[0])
    if self.act_granularity not in ACT_GRANULARITIES:
      raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {self.act_granularity!r}")
    if self.weight_group_size is not None:
      if not isinstance(self.weight_group_size, int) or self.weight_group_size < 2 or self.weight_group_size % 2:
        raise ValueError(f"weight_group_size must be an even int >= 2 or None, got {self.weight_group_size!r}")
      if self.act_granularity != "token":
        raise ValueError("weight_group_size needs act_granularity='token' (grouped weights run through the "
                         f"W4Ax GEMM, whose activations are per token), got {self.act_granularity!r}")
      if self.act_bits is None:
        raise ValueError("weight_group_size needs act_bits (the W4Ax GEMM path quantizes activations)")
    if self.rotation not in ROTATIONS:
      raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
    if self.rotation is not None and (self.act_granularity != "token" or self.act_bits is None):
      raise ValueError("rotation needs per-token activations (act_granularity='token' and act_bits set), got "
                       f"act_granularity={self.act_granularity!r}, act_bits={self.act_bits!r}")

  def timestep_group(self, t: jax.Array) -> jax.Array:
    """Integer timestep(s) in [0, num_timesteps) -> activation-scale group index."""
    t = jnp.asarray(t)
    group = (t.astype(jnp.int32) * self.num_timestep_groups) // self.num_timesteps
    return jnp.clip(group, 0, self.num_timestep_groups - 1)


PRESETS = {
  "w8a8": DiffusionQuantConfig(weight_bits=8, act_bits=8),
  "w4a8": DiffusionQuantConfig(weight_bits=4, act_bits=8),
  "w4a4": DiffusionQuantConfig(weight_bits=4, act_bits=4),
}


def preset(name: str) -> DiffusionQuantConfig:
  if name not in PRESETS:
    raise ValueError(f"quantization preset must be one of {sorted(PRESETS)}, got {name!r}")
  return PRESETS[name]


# ----------------------------------------------------------------------------------------------
# Integer helpers


def signed_range(bits: int) -> tuple[int, int]:
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: jax.Array) -> jax.Array:
  """Round to nearest with a straight-through (identity) gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def pack_int4(values: jax.Array) -> jax.Array:
  """int values in [-8, 7], [K, N] with K even -> uint8 [K//2, N], row 2i in the low nibble."""
  if values.shape[0] % 2:
    raise ValueError(f"pack_int4 needs an even number of rows, got shape {values.shape}")
  return qtypes.pack_int4(values.astype(jnp.int8), axis=0)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [K//2, N] -> int8 [K, N] with sign extension (inverse of `pack_int4`)."""
  return qtypes.unpack_int4(packed, axis=0)


def quantize_activation_int(x: jax.Array, step: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Static asymmetric activation quantization: x ~ step * (x_int - zero); x_int is int8."""
  qmin, qmax = signed_range(bits)
  return jnp.clip(jnp.round(x / step) + jnp.round(zero), qmin, qmax).astype(jnp.int8)


def fake_activation_codes(x: jax.Array, step: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """x_int - zero of `quantize_activation_int` as an integer-valued float with LSQ-style straight-through
  gradients: x ~ step * codes."""
  qmin, qmax = signed_range(bits)
  zero = round_ste(zero)
  return jnp.clip(round_ste(x / step) + zero, qmin, qmax) - zero


def fake_quantize_activation(x: jax.Array, step: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Float simulation of `quantize_activation_int` with LSQ-style straight-through gradients."""
  return fake_activation_codes(x, step, zero, bits) * step


# ----------------------------------------------------------------------------------------------
# The integer leaf


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StaticActQuantWeight:
  """Packed INT4/INT8 weight + a static activation quantizer: `ops.linear` runs it as an integer GEMM.

  `act_step`/`act_zero` are scalars already chosen for the current timestep group.
  """

  data: jax.Array  # uint8 [K_pad//2, N] (INT4, packed) or int8 [K, N] (INT8)
  weight_scale: jax.Array  # f32 [1, N]
  column_sums: jax.Array  # int32 [N]: sum over K of the integer weight, for the zero-point term
  act_step: jax.Array  # f32 []
  act_zero: jax.Array  # f32 []
  in_features: int = dataclasses.field(metadata=dict(static=True))
  weight_bits: int = dataclasses.field(metadata=dict(static=True))
  act_bits: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.weight_scale.shape[-1])

  def integer_weight(self) -> jax.Array:  # int8 [K, N]
    if self.weight_bits <= 4:
      return unpack_int4(self.data)[: self.in_features]
    return self.data

  def quantized_matmul(self, x: jax.Array, implementation: str = "xla") -> jax.Array:
    # One path for every backend: XLA's int8 dot with int32 accumulation (the shapes are tiny).
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x last dim must be in_features={self.in_features}, got shape {x.shape}")
    x_int = quantize_activation_int(x, self.act_step, self.act_zero, self.act_bits)  # int8 [..., K]
    accumulator = jnp.dot(x_int, self.integer_weight(), preferred_element_type=jnp.int32)  # [..., N]
    zero = jnp.round(self.act_zero).astype(jnp.int32)
    accumulator = accumulator - zero * self.column_sums
    return accumulator.astype(jnp.float32) * (self.act_step * self.weight_scale[0])


def make_static_act_weight(weight_int: jax.Array, weight_scale: jax.Array, act_step, act_zero, *,
                           weight_bits: int, act_bits: int) -> StaticActQuantWeight:
  """weight_int: integer-valued [K, N]; weight_scale: [N]."""
  in_features = weight_int.shape[0]
  weight_int = weight_int.astype(jnp.int8)
  if weight_bits <= 4:
    padded = jnp.pad(weight_int, ((0, in_features % 2), (0, 0)))
    data = pack_int4(padded)
  else:
    data = weight_int
  return StaticActQuantWeight(
    data=data, weight_scale=weight_scale.reshape(1, -1).astype(jnp.float32),
    column_sums=weight_int.astype(jnp.int32).sum(0), act_step=jnp.asarray(act_step, jnp.float32),
    act_zero=jnp.asarray(act_zero, jnp.float32), in_features=in_features, weight_bits=weight_bits,
    act_bits=act_bits)


def token_act_leaf(data: jax.Array, weight_scale: jax.Array, *, in_features: int, weight_bits: int, act_bits: int,
                   group_size: int | None):
  """A W4Ax GEMM leaf from `make_static_act_weight`'s weight storage (`data`: packed uint8 [ceil(K/2), N]
  for 4 bit, int8 [K, N] for 8 bit) and scales ([K // group_size, N] or [N]).

  The activation format is one region: all INT4 (act_bits <= 4) or all INT8, one scale per token.
  Returns a `qtypes.QuantizedWeight`; when K is odd, wrapped in an `InputTransformWeight` that zero-pads the
  input to the packed even K (zero channels leave every per-token scale and every product unchanged).
  """
  if act_bits not in (4, 8):
    raise ValueError(f"per-token activations run through the W4Ax GEMM: act_bits must be 4 or 8, got {act_bits}")
  if weight_bits not in (4, 8):
    raise ValueError(f"per-token activations run through the W4Ax GEMM: weight_bits must be 4 or 8, got "
                     f"{weight_bits}")
  out_features = data.shape[-1]
  padded = in_features + in_features % 2
  if weight_bits == 8 and padded != data.shape[0]:
    data = jnp.pad(data, ((0, padded - data.shape[0]), (0, 0)))
  fmt = qtypes.ActivationFormat(padded, 1 if act_bits == 8 else 0, 1)
  leaf = qtypes.QuantizedWeight(data=data, scales=weight_scale.reshape(-1, out_features).astype(jnp.float32),
                                perm=None, bits=weight_bits, group_size=group_size, shape=(padded, out_features),
                                activation=fmt)
  return leaf if padded == in_features else InputTransformWeight(inner=leaf, rotation=None, in_features=in_features)


def rotation_blocks(in_features: int, seed: int = 0) -> np.ndarray | None:
  """The online input rotation of a layer with K = `in_features` inputs: f32 [K // b, b, b] (every block the
  same randomized Hadamard matrix), or None when K is odd.

  b = K when a Hadamard matrix of order K is built here and K <= MAX_ROTATION_BLOCK, else the largest
  power of two <= MAX_ROTATION_BLOCK that divides K (e.g. a 7x7 conv on 16 channels, K = 784: b = 16).
  """
  from cometjax import rotation
  if rotation.hadamard_exists(in_features) and in_features <= MAX_ROTATION_BLOCK:
    block = in_features
  else:
    block = 1
    while in_features % (2 * block) == 0 and 2 * block <= MAX_ROTATION_BLOCK:
      block *= 2
  if block < 2:
    return None
  # x @ diag(s) H: the signs flip input channels before H mixes them.  H diag(s) would leave a
  # non-negative input (after a ReLU) with its whole mean in one output channel, an outlier it created.
  matrix = rotation.random_hadamard(block, seed).T.astype(np.float32)
  return np.ascontiguousarray(np.broadcast_to(matrix, (in_features // block, block, block)))


def rotate_kernel(kernel: jax.Array, blocks: jax.Array) -> jax.Array:
  """kernel [K, N] -> R^T kernel for R = blockdiag(blocks), so that (x R) @ (R^T kernel) = x @ kernel."""
  chunks, b, _ = blocks.shape
  rotated = jnp.einsum("cbd,cbn->cdn", blocks.astype(kernel.dtype), kernel.reshape(chunks, b, -1))
  return rotated.reshape(kernel.shape)


def integer_act_matmul(a_int: jax.Array, a_step, a_zero, b_int: jax.Array, b_step, b_zero) -> jax.Array:
  """(a_step (a_int - a_zero)) @ (b_step (b_int - b_zero)) with an int32 accumulator.

  a_int: int8 [..., M, K]; b_int: int8 [..., K, N].
  """
  a_zero = jnp.round(a_zero).astype(jnp.int32)
  b_zero = jnp.round(b_zero).astype(jnp.int32)
  depth = a_int.shape[-1]
  accumulator = jnp.matmul(a_int, b_int, preferred_element_type=jnp.int32)
  accumulator = (accumulator - a_zero * b_int.astype(jnp.int32).sum(-2, keepdims=True)
                 - b_zero * a_int.astype(jnp.int32).sum(-1, keepdims=True) + a_zero * b_zero * depth)
  return accumulator.astype(jnp.float32) * (a_step * b_step)


# ----------------------------------------------------------------------------------------------
# NNX quantizer modules (attached to layers by `attach_quantizers`)


class QuantParam(nnx.Param):
  """Learnable quantization parameter: activation step sizes / zero points, weight scales."""


class AdaRoundParam(nnx.Param):
  """AdaRound's continuous rounding variable V (soft rounding h(V) in [0, 1])."""


class IntegerState(nnx.Variable):
  """Frozen arrays, never trained: a converted layer's integer weights, an input rotation."""


ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  return jnp.clip(jax.nn.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


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
    step, zero = self.params_for(group, x)
    return fake_quantize_activation(x, step, zero, self.bits)

  def centered_codes(self, x: jax.Array, group) -> tuple[jax.Array, jax.Array]:
    """(`fake_activation_codes` with this group's step and zero point, step): x ~ step * codes."""
    step, zero = self.params_for(group, x)
    return fake_activation_codes(x, step, zero, self.bits), step

  def quantize_int(self, x: jax.Array, group) -> tuple[jax.Array, jax.Array, jax.Array]:
    step, zero = self.params_for(group, x)
    return quantize_activation_int(x, step, zero, self.bits), step, zero

  def set_range(self, group: int, low: float, high: float):
    """Step and zero point so [low, high] maps onto the integer range (low <= 0 <= high enforced)."""
    qmin, qmax = signed_range(self.bits)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    step = max((high - low) / (qmax - qmin), 1e-8)
    self.step[...] = self.step[...].at[group].set(step)
    self.zero[...] = self.zero[...].at[group].set(float(np.round(qmin - low / step)))


class TokenActQuantizer(nnx.Module):
  """Dynamic symmetric per-token activation quantizer (the W4Ax GEMM's): scale = max|x| / qmax per token.

  Nothing to calibrate or learn; the timestep group is ignored.  The codes match
  `cometjax.pallas.quantize_act.quantize_act_reference` for a single-region format.
  """

  def __init__(self, bits: int):
    self.bits = bits

  def __call__(self, x: jax.Array, group=None) -> jax.Array:  # [..., K]
    codes, scale = qtypes.quantize_symmetric(jax.lax.stop_gradient(x), self.bits, axis=-1)  # [..., K], [..., 1]
    scaled = x / scale
    return (scaled + jax.lax.stop_gradient(codes - scaled)) * scale  # straight-through rounding


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

    Later finetuning then starts exactly at the AdaRound solution.
    """
    self.soft = False
    kernel_variable[...] = self(kernel_variable[...])
    self.rounding, self.adaround_v = "nearest", nnx.data(None)


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
    error = ((jnp.clip(jnp.round(grouped / scale[:, None]), qmin, qmax) * scale[:, None] - grouped) ** 2).sum(1)
    better = error < best_error
    best_scale = jnp.where(better, scale, best_scale)
    best_error = jnp.where(better, error, best_error)
  return (best_scale[0] if group_size is None else best_scale).astype(jnp.float32)


class LinearQuantizer(nnx.Module):
  """Quantizer of one linear (or im2col conv) layer: input activations + weights."""

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

  def rotate_input(self, x: jax.Array) -> jax.Array:
    if self.rotation is None:
      return x
    return apply_block_rotation(x, self.rotation[...])

  def fake_linear(self, x: jax.Array, kernel: jax.Array, bias: jax.Array | None, group) -> jax.Array:
    """Simulated quantized x @ kernel + bias (x [..., K])."""
    x = self.rotate_input(x)
    if self.act is not None:
      x = self.act(x, group)
    return ops.linear(x, self.weight(kernel), bias)

  def to_integer(self, kernel: jax.Array):
    if self.act is None:
      raise ValueError("integer execution needs an activation quantizer (act_bits is None)")
    if self.weight.group_size is not None and not self.per_token:
      raise ValueError("grouped weight scales run only with per-token activations (act_granularity='token')")
    values = self.weight.integer_values(kernel)
    leaf = make_static_act_weight(values, self.weight.scale[...], 0.0, 0.0, weight_bits=self.weight.bits,
                                  act_bits=self.act.bits)
    if self.per_token:  # checks the bit widths the W4Ax GEMM takes before anything is switched
      token_act_leaf(leaf.data, self.weight.scale[...], in_features=kernel.shape[0], weight_bits=self.weight.bits,
                     act_bits=self.act.bits, group_size=self.weight.group_size)
    self.integer_data = IntegerState(leaf.data)
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


# ----------------------------------------------------------------------------------------------
# Layers used by the diffusion models


class QuantLinear(nnx.Module):
  """y = x @ kernel + bias through `ops.linear`; quantizes when a `LinearQuantizer` is attached."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None):  # kernel [in, out]
    self.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
    self.bias = nnx.Param(jnp.asarray(bias, jnp.float32)) if bias is not None else nnx.data(None)
    self.quant = nnx.data(None)
    self.edge = False  # first or last layer: its input stays at 8 bit
    self.record = False  # sow the input (nnx.Intermediate "inputs") for calibration

  def __call__(self, x: jax.Array, group=0) -> jax.Array:  # x [..., in] -> [..., out]
    if self.record:
      self.sow(nnx.Intermediate, "inputs", x)
    bias = self.bias[...] if self.bias is not None else None
    quant = self.quant
    if quant is None:
      return ops.linear(x, self.kernel[...], bias)
    if quant.execution == "integer":
      return ops.linear(x, quant.integer_leaf(group), bias)
    return quant.fake_linear(x, self.kernel[...], bias, group)

  def float_output(self, x: jax.Array) -> jax.Array:
    """The unquantized layer: x @ kernel + bias, with the input rotation the kernel was rotated for."""
    bias = self.bias[...] if self.bias is not None else None
    if self.quant is not None:
      x = self.quant.rotate_input(x)
    return ops.linear(x, self.kernel[...], bias)


class QuantMatmul(nnx.Module):
  """a @ b, quantized when a `MatmulQuantizer` is attached."""

  def __init__(self, softmax_lhs: bool = False):
    self.softmax_lhs = softmax_lhs  # lhs is a softmax output (kept at 8 bit)
    self.quant = nnx.data(None)
    self.record = False

  def __call__(self, a: jax.Array, b: jax.Array, group=0) -> jax.Array:
    if self.record:
      self.sow(nnx.Intermediate, "lhs", a)
      self.sow(nnx.Intermediate, "rhs", b)
    if self.quant is None:
      return jnp.matmul(a, b)
    return self.quant(a, b, group)


def named_modules(model: nnx.Module, kind) -> Iterator[tuple[str, nnx.Module]]:
  """(dotted path, module) for every submodule of type `kind`, in a stable order."""
  for path, module in nnx.iter_graph(model):
    if isinstance(module, kind):
      yield ".".join(str(p) for p in path), module


def attach_quantizers(model: nnx.Module, config: DiffusionQuantConfig) -> nnx.Module:
  """Attach fresh (uncalibrated) quantizers to every QuantLinear/QuantMatmul of `model`, in place.

  With config.rotation the kernels of the rotated layers become R^T W (their quantizer holds R), so a
  model whose kernels were rotated cannot take quantizers again: load it afresh.
  """
  keep = [re.compile(p) for p in config.keep_float]
  for name, layer in named_modules(model, QuantLinear):
    if layer.quant is not None and layer.quant.rotation is not None:
      raise ValueError(f"layer {name}: its kernel was rotated by an earlier attach_quantizers(rotation="
                       "'hadamard'); attach quantizers to a freshly loaded model")
    if any(p.search(name) for p in keep):
      continue
    act_bits, weight_bits = config.act_bits, config.weight_bits
    override = next((bits for pattern, bits in config.act_bits_overrides if re.search(pattern, name)), None)
    if override is not None and act_bits is not None:
      act_bits = override
    if layer.edge:
      weight_bits = max(weight_bits, config.edge_weight_bits)
      act_bits = max(act_bits, config.edge_act_bits) if act_bits is not None else None
    group_size = config.weight_group_size
    if group_size is not None and layer.kernel.shape[0] % group_size:
      group_size = None  # e.g. a 3x3 conv on one channel (K = 9): per-output-channel scales
    blocks = None
    if config.rotation is not None and act_bits is not None:
      blocks = rotation_blocks(layer.kernel.shape[0])
      if blocks is not None:
        layer.kernel[...] = rotate_kernel(layer.kernel[...], jnp.asarray(blocks))
    layer.quant = LinearQuantizer(layer.kernel[...], weight_bits, act_bits, config.num_timestep_groups,
                                  config.act_granularity, group_size, blocks)
  if config.quantize_attention_matmuls and config.act_bits is not None:
    for name, matmul in named_modules(model, QuantMatmul):
      if any(p.search(name) for p in keep):
        continue
      lhs_bits = max(config.act_bits, config.softmax_bits) if matmul.softmax_lhs else config.act_bits
      matmul.quant = MatmulQuantizer(lhs_bits, config.act_bits, config.num_timestep_groups)
  return model


def to_integer(model: nnx.Module) -> nnx.Module:
  """Switch every quantized layer to real integer execution (packed weights), in place."""
  for _, layer in named_modules(model, QuantLinear):
    if layer.quant is not None:
      layer.quant.to_integer(layer.kernel[...])
  for _, matmul in named_modules(model, QuantMatmul):
    if matmul.quant is not None:
      matmul.quant.execution = "integer"
  return model


def set_recording(model: nnx.Module, on: bool) -> None:
  for _, module in nnx.iter_graph(model):
    if isinstance(module, (QuantLinear, QuantMatmul)):
      module.record = on


def act_quantizers(model: nnx.Module) -> Iterator[tuple[str, ActQuantizer]]:
  yield from named_modules(model, ActQuantizer)
