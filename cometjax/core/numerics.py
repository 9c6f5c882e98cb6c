"""Rounding, INT4 packing and the scalar quantizers every format here is built from.

Rounding
  Every quantizer rounds with `round_half_up(v) = floor(v + 0.5)`, in the XLA path and inside the kernels
  alike (the Pallas Triton backend has no round-to-nearest-even op), so all paths produce the same codes.

INT4 packing (`pack_int4` / `unpack_int4`)
  Two 4-bit values per uint8 byte along `axis`: element 2i in the low nibble, element 2i+1 in the high
  nibble. Signed values in [-8, 7] are stored as two's complement nibbles; asymmetric codes in [0, 15]
  are stored as is (`unpack_int4(..., signed=False)`). The length along `axis` must be even.

Symmetric quantization (`quantize_symmetric`)
  scale = clip_ratio * max|x| / qmax over `axis` (keepdims), qmax = 2**(bits-1) - 1 (7 or 127);
  q = clip(round_half_up(x / scale), -qmax, qmax) as int8; x ~= q * scale. A slice that is all zeros
  gets scale 1, so zeros stay exact.

Asymmetric quantization (`quantize_asymmetric`)
  scale = (max - min) / (2**bits - 1), q = clip(round_half_up(x / scale + zero), 0, 2**bits - 1) as uint8,
  x ~= (q - zero) * scale. The zero point is the float -min / scale by default, so the grid's ends are the
  slice's min and max (KIVI's quantizer); integer_zero=True rounds it to an integer first (then q =
  round_half_up(x / scale) + zero, the usual integer zero point, whose grid is shifted off min by up to half
  a step). A constant slice gets scale 1.

Asymmetric signed weights (`quantize_asymmetric_signed`)
  The 4-bit weight grid with a float zero point: codes q in [-2**(bits-1), 2**(bits-1) - 1] (the signed
  nibbles of the symmetric format), x ~= scale * (q - zero), scale = (max - min) / (2**bits - 1) and
  zero = -2**(bits-1) - min / scale, so q = -8 lands on min and q = 7 on max (clip_ratio < 1 shrinks both
  ends by that ratio).

Static asymmetric activations (`quantize_static`)
  The diffusion models' per-tensor quantizer with a calibrated (step, zero point):
  q = clip(round_half_up(x / step) + round_half_up(zero), -2**(bits-1), 2**(bits-1) - 1) as int8,
  x ~= step * (q - zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_half_up(v: jax.Array) -> jax.Array:
  """floor(v + 0.5): the rounding used by every quantizer here (kernels included)."""
  return jnp.floor(v + 0.5)


# Reductions over at most this many elements are written as chains of elementwise min / max
# (`short_min` / `short_max`): XLA fuses those into the ops that use them, where a reduce is a kernel call of
# its own (on a CPU a decode step's cost is counted in kernel calls). min and max are exact: the values equal
# jnp.min / jnp.max's.
SHORT_REDUCTION = 16


def _short_reduce(op, reduce, x: jax.Array, axis: int, keepdims: bool) -> jax.Array:
  axis = normalize_axis(axis, x.ndim)
  n = x.shape[axis]
  if n > SHORT_REDUCTION or n == 0:
    return reduce(x, axis=axis, keepdims=keepdims)
  parts = [jax.lax.index_in_dim(x, i, axis, keepdims=keepdims) for i in range(n)]
  while len(parts) > 1:  # a balanced tree: log2(n) dependent ops
    parts = [op(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
  return parts[0]


def short_max(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """jnp.max(x, axis) (one axis), as elementwise maxima when the axis is short (SHORT_REDUCTION)."""
  return _short_reduce(jnp.maximum, jnp.max, x, axis, keepdims)


def short_min(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """jnp.min(x, axis) (one axis), as elementwise minima when the axis is short (SHORT_REDUCTION)."""
  return _short_reduce(jnp.minimum, jnp.min, x, axis, keepdims)


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name} must be in [-{ndim}, {ndim}) for an array of rank {ndim}, got {axis}")
  return axis % ndim


def pack_int4(values: jax.Array, axis: int = -1) -> jax.Array:
  """Packs 4-bit values two per uint8 byte along `axis` (even index -> low nibble).

  values: int8 in [-8, 7] (two's complement nibbles) or integer codes in [0, 15]; the length along
  `axis` must be even. Returns uint8 with that length halved.
  """
  values = jnp.asarray(values)
  axis = normalize_axis(axis, values.ndim)
  length = values.shape[axis]
  if length % 2:
    raise ValueError(f"pack_int4 needs an even length along axis {axis}, got shape {values.shape}")
  nibbles = jnp.moveaxis(values.astype(jnp.int32) & 0xF, axis, -1)
  nibbles = nibbles.reshape(*nibbles.shape[:-1], length // 2, 2)
  packed = (nibbles[..., 0] | (nibbles[..., 1] << 4)).astype(jnp.uint8)
  return jnp.moveaxis(packed, -1, axis)


def unpack_int4(packed: jax.Array, axis: int = -1, signed: bool = True) -> jax.Array:
  """Inverse of `pack_int4`: uint8 [..., n, ...] -> int8 [..., 2n, ...] along `axis`.

  signed=True gives values in [-8, 7]; signed=False gives codes in [0, 15].
  """
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack_int4 expects uint8 packed data, got {packed.dtype}")
  axis = normalize_axis(axis, packed.ndim)
  as_int = jnp.moveaxis(packed, axis, -1).astype(jnp.int32)
  low, high = as_int & 0xF, as_int >> 4
  if signed:
    low, high = (low ^ 8) - 8, (high ^ 8) - 8
  unpacked = jnp.stack([low, high], axis=-1).reshape(*as_int.shape[:-1], 2 * as_int.shape[-1])
  return jnp.moveaxis(unpacked.astype(jnp.int8), -1, axis)


def check_bits(bits: int, allowed=(2, 3, 4, 5, 6, 7, 8)) -> None:
  if bits not in allowed:
    raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


def symmetric_qmax(bits: int) -> int:
  """The largest code of a symmetric quantizer: 2**(bits-1) - 1 (7 for INT4, 127 for INT8)."""
  return 2 ** (bits - 1) - 1


def signed_range(bits: int) -> tuple[int, int]:
  """(min, max) of a two's complement integer of `bits` bits."""
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize_symmetric(x: jax.Array, bits: int, axis=-1, clip_ratio: float = 1.0):
  """Symmetric quantization, one scale per slice reduced over `axis` (int or tuple; keepdims).

  Returns (q int8 in [-qmax, qmax], scale f32) with x ~= q * scale and qmax = 2**(bits-1) - 1.
  clip_ratio < 1 shrinks the range; values beyond it saturate at +-qmax.
  """
  check_bits(bits)
  if not 0.0 < clip_ratio <= 1.0:
    raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
  qmax = symmetric_qmax(bits)
  x = jnp.asarray(x, jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True) * clip_ratio
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(round_half_up(x / scale), -qmax, qmax).astype(jnp.int8)
  return q, scale


def dequantize_symmetric(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  return (q.astype(jnp.float32) * scale).astype(dtype)


def quantize_asymmetric(x: jax.Array, bits: int, axis=-1, integer_zero: bool = False):
  """Asymmetric quantization: returns (q uint8 in [0, 2**bits - 1], scale f32, zero f32).

  x ~= (q - zero) * scale; scale and zero are reduced over `axis` (keepdims); zero is -min / scale, or that
  rounded to an integer with integer_zero=True (module docstring).
  """
  check_bits(bits)
  qmax = 2**bits - 1
  x = jnp.asarray(x, jnp.float32)
  low = short_min(x, axis=axis, keepdims=True)
  high = short_max(x, axis=axis, keepdims=True)

  def grid(low, high):  # (scale, zero)
    scale = jnp.where(high > low, (high - low) / qmax, 1.0)
    return scale, (round_half_up(-low / scale) if integer_zero else -low / scale)

  scale, zero = grid(low, high)
  # the codes recompute the grid at x's shape (the same values): XLA then fuses the quantizer into one loop
  # instead of first materializing scale and zero (each a kernel call on a CPU)
  scale_x, zero_x = grid(jnp.broadcast_to(low, x.shape), jnp.broadcast_to(high, x.shape))
  q = round_half_up(x / scale_x) + zero_x if integer_zero else round_half_up(x / scale_x + zero_x)
  return jnp.clip(q, 0, qmax).astype(jnp.uint8), scale, zero


def asymmetric_signed_params(low: jax.Array, high: jax.Array, bits: int, integer_zero: bool = False):
  """(scale, zero) of the signed asymmetric grid over [low, high] (module docstring); low <= 0 <= high is not
  required. A slice with high == low gets scale 1 (its codes then sit at zero's rounding).

  integer_zero: the grid spans [min(low, 0), max(high, 0)] and the zero point is rounded to an integer code in
  [-2**(bits-1), 2**(bits-1) - 1] (GPTQ's and QServe's format: it packs in `bits` bits, where a float zero is
  stored in a float dtype); 0.0 is then exactly on the grid."""
  qmin, qmax = signed_range(bits)
  if integer_zero:
    low, high = jnp.minimum(low, 0.0), jnp.maximum(high, 0.0)
  scale = jnp.where(high > low, (high - low) / (2**bits - 1), 1.0)
  zero = jnp.where(high > low, qmin - low / scale, -low)
  if integer_zero:
    zero = jnp.clip(round_half_up(zero), qmin, qmax)
  return scale, zero


def quantize_asymmetric_signed(x: jax.Array, bits: int, axis=-1, clip_ratio: float = 1.0):
  """Signed asymmetric quantization: (q int8 in [-2**(bits-1), 2**(bits-1) - 1], scale f32, zero f32) with
  x ~= scale * (q - zero), scale and zero reduced over `axis` (keepdims; module docstring)."""
  check_bits(bits)
  if not 0.0 < clip_ratio <= 1.0:
    raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
  x = jnp.asarray(x, jnp.float32)
  low = jnp.min(x, axis=axis, keepdims=True) * clip_ratio
  high = jnp.max(x, axis=axis, keepdims=True) * clip_ratio
  scale, zero = asymmetric_signed_params(low, high, bits)
  return quantize_with_zero(x, scale, zero, bits), scale, zero


def quantize_with_zero(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Signed codes int8 clip(round_half_up(x / scale + zero), -2**(bits-1), 2**(bits-1) - 1)."""
  qmin, qmax = signed_range(bits)
  return jnp.clip(round_half_up(x / scale + zero), qmin, qmax).astype(jnp.int8)


def dequantize_asymmetric(q: jax.Array, scale: jax.Array, zero: jax.Array, dtype=jnp.float32) -> jax.Array:
  return ((q.astype(jnp.float32) - zero) * scale).astype(dtype)


def quantize_static(x: jax.Array, step: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Static asymmetric activation codes int8 (module docstring): x ~= step * (q - round_half_up(zero))."""
  qmin, qmax = signed_range(bits)
  return jnp.clip(round_half_up(x / step) + round_half_up(zero), qmin, qmax).astype(jnp.int8)
