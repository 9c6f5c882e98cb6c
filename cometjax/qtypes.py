"""Quantized tensor formats shared by the quantization pipeline, the models and the Pallas kernels.

Every format here is fixed; the kernels in `cometjax.pallas` read exactly these layouts.

Rounding
  Every quantizer rounds with `round_half_up(v) = floor(v + 0.5)`, in the XLA path and inside the
  kernels alike (the Pallas Triton backend has no round-to-nearest-even op), so all paths produce the
  same integer codes.

INT4 packing (`pack_int4` / `unpack_int4`)
  Two 4-bit values per uint8 byte along `axis`: element 2i in the low nibble, element 2i+1 in the high
  nibble. Signed values in [-8, 7] are stored as two's complement nibbles; asymmetric codes in [0, 15]
  are stored as is (`unpack_int4(..., signed=False)`). The length along `axis` must be even.

Symmetric quantization (`quantize_symmetric`)
  scale = clip_ratio * max|x| / qmax over `axis` (keepdims), qmax = 2**(bits-1) - 1 (7 or 127);
  q = clip(round_half_up(x / scale), -qmax, qmax) as int8; x ~= q * scale. A slice that is all zeros
  gets scale 1, so zeros stay exact.

Asymmetric quantization (`quantize_asymmetric`)
  scale = (max - min) / (2**bits - 1), zero = round_half_up(-min / scale) (an integer-valued float, not
  clipped), q = clip(round_half_up(x / scale) + zero, 0, 2**bits - 1) as uint8; x ~= (q - zero) * scale.
  A constant slice gets scale 1.

FMPQ activations (`ActivationFormat`, `QuantizedActivation`)
  The K input channels of a linear layer, after the channel permutation `perm` (x_perm = x[..., perm]),
  are split into `num_blocks` blocks of `block_size` channels; the first `num_int8_blocks` blocks run at
  INT8, the rest at INT4. Each precision group has its own symmetric per-token scale. With
  K8 = int8_channels and K4 = int4_channels, a quantized activation of M tokens holds
    int8_part  int8  [2, M, K8 // 2]  [0] = even channels 0, 2, 4, ... of the INT8 region, [1] = odd ones
    int4_part  uint8 [M, K4 // 2]     pack_int4 of the INT4 region along channels
    int8_scale f32   [M]              per-token scale of the INT8 group (max|x| / 127)
    int4_scale f32   [M]              per-token scale of the INT4 group (max|x| / 7)
  The even/odd split matches the weight packing (rows 2i / 2i+1 in one byte), so the matmul kernel
  multiplies even channels with low nibbles and odd channels with high nibbles and never interleaves.

Weights (`QuantizedWeight`, `quantize_weight`)
  Layout [in=K, out=N]. bits=4: `data` uint8 [K // 2, N], pack_int4 along K (row 2i low nibble, row
  2i+1 high nibble); bits=8: int8 [K, N]. `scales` f32 [K // group_size, N] or [1, N] per output channel.
  Rows of `data` are already in permuted order (row r holds original input channel perm[r]), and scale
  groups are contiguous in that permuted order. `perm` int32 [K] or None (identity).
  `dequantize_weight(qw)` returns the float weight in permuted row order (pair with x[..., perm]);
  `dequantize_weight(qw, original_order=True)` undoes the permutation (pair with x).

KV4 cache (`QuantizedKV`, `quantize_kv`, `dequantize_kv`)
  k, v uint8 [B, S, Hkv, D // 2] (pack_int4 of asymmetric codes along head_dim); k_scale, k_zero,
  v_scale, v_zero f32 [B, S, Hkv, D // group]: asymmetric INT4 per token, per KV head, per group of
  `group` head_dim channels (group = head_dim by default).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------------------------------------
# Rounding and INT4 packing


def round_half_up(v: jax.Array) -> jax.Array:
  """floor(v + 0.5): the rounding used by every quantizer here (kernels included)."""
  return jnp.floor(v + 0.5)


def _normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{name} must be in [-{ndim}, {ndim}) for an array of rank {ndim}, got {axis}")
  return axis % ndim


def pack_int4(values: jax.Array, axis: int = -1) -> jax.Array:
  """Packs 4-bit values two per uint8 byte along `axis` (even index -> low nibble).

  values: int8 in [-8, 7] (two's complement nibbles) or integer codes in [0, 15]; the length along
  `axis` must be even. Returns uint8 with that length halved.
  """
  values = jnp.asarray(values)
  axis = _normalize_axis(axis, values.ndim)
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
  axis = _normalize_axis(axis, packed.ndim)
  as_int = jnp.moveaxis(packed, axis, -1).astype(jnp.int32)
  low, high = as_int & 0xF, as_int >> 4
  if signed:
    low, high = (low ^ 8) - 8, (high ^ 8) - 8
  unpacked = jnp.stack([low, high], axis=-1).reshape(*as_int.shape[:-1], 2 * as_int.shape[-1])
  return jnp.moveaxis(unpacked.astype(jnp.int8), -1, axis)


# ------------------------------------------------------------------------------------------------
# Scalar quantizers


def _check_bits(bits: int, allowed=(2, 3, 4, 5, 6, 7, 8)) -> None:
  if bits not in allowed:
    raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


def quantize_symmetric(x: jax.Array, bits: int, axis=-1, clip_ratio: float = 1.0):
  """Symmetric quantization, one scale per slice reduced over `axis` (int or tuple; keepdims).

  Returns (q int8 in [-qmax, qmax], scale f32) with x ~= q * scale and qmax = 2**(bits-1) - 1.
  clip_ratio < 1 shrinks the range; values beyond it saturate at +-qmax.
  """
  _check_bits(bits)
  if not 0.0 < clip_ratio <= 1.0:
    raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
  qmax = 2 ** (bits - 1) - 1
  x = jnp.asarray(x, jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True) * clip_ratio
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(round_half_up(x / scale), -qmax, qmax).astype(jnp.int8)
  return q, scale


def dequantize_symmetric(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  return (q.astype(jnp.float32) * scale).astype(dtype)


def quantize_asymmetric(x: jax.Array, bits: int, axis=-1):
  """Asymmetric quantization: returns (q uint8 in [0, 2**bits - 1], scale f32, zero f32).

  x ~= (q - zero) * scale; scale and zero are reduced over `axis` (keepdims); zero is integer-valued.
  """
  _check_bits(bits)
  qmax = 2**bits - 1
  x = jnp.asarray(x, jnp.float32)
  low = jnp.min(x, axis=axis, keepdims=True)
  high = jnp.max(x, axis=axis, keepdims=True)
  scale = jnp.where(high > low, (high - low) / qmax, 1.0)
  zero = round_half_up(-low / scale)
  q = jnp.clip(round_half_up(x / scale) + zero, 0, qmax).astype(jnp.uint8)
  return q, scale, zero


def dequantize_asymmetric(q: jax.Array, scale: jax.Array, zero: jax.Array, dtype=jnp.float32) -> jax.Array:
  return ((q.astype(jnp.float32) - zero) * scale).astype(dtype)


# ------------------------------------------------------------------------------------------------
# FMPQ activation format


@dataclasses.dataclass(frozen=True)
class ActivationFormat:
  """Mixed INT8/INT4 activation plan of one linear layer (static, hashable)."""

  block_size: int
  num_int8_blocks: int
  num_blocks: int

  def __post_init__(self):
    if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 2:
      raise ValueError(f"block_size must be a positive even int, got {self.block_size!r}")
    if not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
      raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
    if not isinstance(self.num_int8_blocks, int) or not 0 <= self.num_int8_blocks <= self.num_blocks:
      raise ValueError(f"num_int8_blocks must be an int in [0, num_blocks={self.num_blocks}], "
                       f"got {self.num_int8_blocks!r}")

  @classmethod
  def for_features(cls, in_features: int, block_size: int = 128, int8_fraction: float = 0.0):
    """Format for `in_features` channels with round(int8_fraction * num_blocks) INT8 blocks."""
    if in_features % block_size:
      raise ValueError(f"in_features={in_features} must be a multiple of block_size={block_size}")
    if not 0.0 <= int8_fraction <= 1.0:
      raise ValueError(f"int8_fraction must be in [0, 1], got {int8_fraction}")
    num_blocks = in_features // block_size
    return cls(block_size, int(round(int8_fraction * num_blocks)), num_blocks)

  @property
  def in_features(self) -> int:
    return self.block_size * self.num_blocks

  @property
  def int8_channels(self) -> int:
    return self.block_size * self.num_int8_blocks

  @property
  def int4_channels(self) -> int:
    return self.in_features - self.int8_channels

  @property
  def num_int4_blocks(self) -> int:
    return self.num_blocks - self.num_int8_blocks

  @property
  def int8_block_fraction(self) -> float:
    return self.num_int8_blocks / self.num_blocks

  @property
  def int4_block_fraction(self) -> float:
    return self.num_int4_blocks / self.num_blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedActivation:
  """Activations of M tokens in the FMPQ mixed layout (see the module docstring)."""

  int8_part: jax.Array  # int8 [2, M, K8 // 2]
  int4_part: jax.Array  # uint8 [M, K4 // 2]
  int8_scale: jax.Array  # f32 [M]
  int4_scale: jax.Array  # f32 [M]
  format: ActivationFormat = dataclasses.field(metadata=dict(static=True))

  @property
  def num_tokens(self) -> int:
    return self.int4_part.shape[0]

  def dequantize(self) -> jax.Array:
    """Float activations [M, K] in permuted channel order."""
    even, odd = self.int8_part[0], self.int8_part[1]  # [M, K8 // 2] each
    int8_values = jnp.stack([even, odd], axis=-1).reshape(even.shape[0], -1)
    int4_values = unpack_int4(self.int4_part, axis=-1)
    return jnp.concatenate([int8_values.astype(jnp.float32) * self.int8_scale[:, None],
                            int4_values.astype(jnp.float32) * self.int4_scale[:, None]], axis=-1)


# ------------------------------------------------------------------------------------------------
# Quantized weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A quantized linear weight [in=K, out=N] plus the activation plan of its layer."""

  data: jax.Array  # bits=4: uint8 [K // 2, N]; bits=8: int8 [K, N]; rows in permuted order
  scales: jax.Array  # f32 [K // group_size, N] or [1, N]
  perm: jax.Array | None  # int32 [K] or None (identity)
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  activation: ActivationFormat | None = dataclasses.field(default=None, metadata=dict(static=True))

  def __post_init__(self):
    # Only static fields are checked here: jax rebuilds this class with placeholder leaves.
    if self.bits not in (4, 8):
      raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
    if len(self.shape) != 2:
      raise ValueError(f"shape must be (in_features, out_features), got {self.shape!r}")
    in_features, _ = self.shape
    if self.bits == 4 and in_features % 2:
      raise ValueError(f"4-bit weights need an even in_features, got shape {self.shape}")
    if self.group_size is not None and (self.group_size <= 0 or in_features % self.group_size):
      raise ValueError(f"group_size must divide in_features={in_features}, got {self.group_size}")
    if self.activation is not None and self.activation.in_features != in_features:
      raise ValueError(f"activation format covers {self.activation.in_features} channels but "
                       f"in_features={in_features}")

  @property
  def in_features(self) -> int:
    return self.shape[0]

  @property
  def out_features(self) -> int:
    return self.shape[1]

  @property
  def num_scale_groups(self) -> int:
    return 1 if self.group_size is None else self.in_features // self.group_size

  def check_arrays(self) -> None:
    """Raises ValueError when the array fields disagree with the static fields."""
    k, n = self.shape
    data_shape = (k // 2, n) if self.bits == 4 else (k, n)
    data_dtype = jnp.uint8 if self.bits == 4 else jnp.int8
    if tuple(self.data.shape) != data_shape or self.data.dtype != data_dtype:
      raise ValueError(f"data must be {jnp.dtype(data_dtype).name} {list(data_shape)} for bits={self.bits}, "
                       f"got {self.data.dtype} {list(self.data.shape)}")
    if tuple(self.scales.shape) != (self.num_scale_groups, n):
      raise ValueError(f"scales must have shape {[self.num_scale_groups, n]} for group_size="
                       f"{self.group_size}, got {list(self.scales.shape)}")
    if self.perm is not None and tuple(self.perm.shape) != (k,):
      raise ValueError(f"perm must have shape [{k}], got {list(self.perm.shape)}")

  def int_values(self) -> jax.Array:
    """Integer weight values int8 [K, N] in permuted row order."""
    return unpack_int4(self.data, axis=0) if self.bits == 4 else self.data

  def permute_input(self, x: jax.Array) -> jax.Array:
    return x if self.perm is None else jnp.take(x, self.perm, axis=-1)

  def quantized_matmul(self, x: jax.Array, implementation: str = "xla") -> jax.Array:
    """y = x @ W: x [..., K] -> [..., N] in x's dtype.

    implementation: "auto" | "xla" | "pallas" | "interpret" (see `cometjax.ops`).
    activation=None: weight-only (A16); the weight is dequantized and multiplied in float (every
    implementation). Otherwise x is permuted and quantized to the FMPQ layout and multiplied with
    integer accumulation: "xla" runs the jnp reference path, "pallas" / "interpret" the Pallas kernels
    (8-bit weights, and shapes the compiled GEMM cannot tile, take the XLA int8 path: same numbers).
    On Hopper, "pallas" runs the Mosaic GPU GEMM (`w4ax_matmul_sm90`) where `w4ax_matmul_sm90.supported`
    says so, else the Triton one; "interpret" always runs the Triton kernel in interpret mode.
    """
    from cometjax.ops import resolve_implementation  # ops imports nothing from here at module level

    implementation = resolve_implementation(implementation)
    self.check_arrays()
    k, n = self.shape
    if x.shape[-1] != k:
      raise ValueError(f"x must have {k} channels in its last axis, got shape {x.shape}")
    leading = x.shape[:-1]
    x2d = x.reshape(-1, k)  # [M, K]
    if self.activation is None:
      w = dequantize_weight(self).astype(x.dtype)  # [K, N] permuted rows
      y = jnp.dot(self.permute_input(x2d), w, preferred_element_type=jnp.float32)
      return y.astype(x.dtype).reshape(*leading, n)

    from cometjax.pallas import quantize_act, w4ax_matmul, w4ax_matmul_sm90  # kernels import this module

    interpret = implementation == "interpret"
    use_pallas = implementation != "xla" and self.bits == 4 and (
        interpret or w4ax_matmul.pallas_supported(self))
    if implementation == "xla":
      qx = quantize_act.quantize_act_reference(x2d, self.perm, self.activation)
    else:
      qx = quantize_act.quantize_act(x2d, self.perm, fmt=self.activation, interpret=interpret)
    if implementation == "pallas" and w4ax_matmul_sm90.supported(self, x2d.shape[0]):
      # Hopper: the Mosaic GPU (wgmma) GEMM; the choice over Triton is unmeasured (see its module doc).
      y = w4ax_matmul_sm90.w4ax_matmul_sm90(qx, self, out_dtype=x.dtype)
    elif use_pallas:
      y = w4ax_matmul.w4ax_matmul(qx, self, out_dtype=x.dtype, interpret=interpret)
    else:
      y = w4ax_matmul.w4ax_matmul_reference(qx, self, out_dtype=x.dtype)
    return y.reshape(*leading, n)


def quantize_weight(w: jax.Array, bits: int = 4, group_size: int | None = None,
                    activation: ActivationFormat | None = None, perm: jax.Array | None = None,
                    clip_ratio: float = 1.0) -> QuantizedWeight:
  """Round-to-nearest symmetric quantization of a float weight [K, N] ([in, out] layout).

  perm (int32 [K], optional) is the input-channel permutation of the layer's activations; the weight
  rows are permuted here (row r <- w[perm[r]]) before grouping and packing.
  """
  if bits not in (4, 8):
    raise ValueError(f"bits must be 4 or 8, got {bits!r}")
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"w must be a 2-D [in_features, out_features] array, got shape {w.shape}")
  k, n = w.shape
  if group_size is not None and (group_size <= 0 or k % group_size):
    raise ValueError(f"group_size must divide in_features={k}, got {group_size}")
  if perm is not None:
    perm = jnp.asarray(perm, jnp.int32)
    if perm.shape != (k,):
      raise ValueError(f"perm must have shape [{k}], got {list(perm.shape)}")
    w = w[perm]
  if group_size is None:
    q, scales = quantize_symmetric(w, bits, axis=0, clip_ratio=clip_ratio)  # [K, N], [1, N]
  else:
    grouped = w.reshape(k // group_size, group_size, n)
    q, scales = quantize_symmetric(grouped, bits, axis=1, clip_ratio=clip_ratio)
    q, scales = q.reshape(k, n), scales.reshape(k // group_size, n)
  data = pack_int4(q, axis=0) if bits == 4 else q
  return QuantizedWeight(data=data, scales=scales.astype(jnp.float32), perm=perm, bits=bits,
                         group_size=group_size, shape=(k, n), activation=activation)


def dequantize_weight(qw: QuantizedWeight, original_order: bool = False, dtype=jnp.float32) -> jax.Array:
  """Float weight [K, N]: permuted row order by default, the original order with original_order=True."""
  k, n = qw.shape
  values = qw.int_values().astype(jnp.float32)  # [K, N]
  scales = jnp.repeat(qw.scales, k // qw.scales.shape[0], axis=0)  # [K, N]
  w = values * scales
  if original_order and qw.perm is not None:
    w = jnp.zeros_like(w).at[qw.perm].set(w)
  return w.astype(dtype)


# ------------------------------------------------------------------------------------------------
# KV4 cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """One layer's INT4 K/V cache, asymmetric per token, per KV head, per head_dim group."""

  k: jax.Array  # uint8 [B, S, Hkv, D // 2]
  v: jax.Array  # uint8 [B, S, Hkv, D // 2]
  k_scale: jax.Array  # f32 [B, S, Hkv, D // group]
  k_zero: jax.Array  # f32 [B, S, Hkv, D // group]
  v_scale: jax.Array  # f32 [B, S, Hkv, D // group]
  v_zero: jax.Array  # f32 [B, S, Hkv, D // group]

  @property
  def head_dim(self) -> int:
    return 2 * self.k.shape[-1]

  @property
  def group_size(self) -> int:
    return self.head_dim // self.k_scale.shape[-1]

  def check_arrays(self) -> None:
    b, s, h, half = self.k.shape
    if self.k.dtype != jnp.uint8 or self.v.dtype != jnp.uint8 or self.v.shape != self.k.shape:
      raise ValueError(f"k and v must both be uint8 [B, S, Hkv, D // 2], got k {self.k.dtype} "
                       f"{list(self.k.shape)}, v {self.v.dtype} {list(self.v.shape)}")
    groups = self.k_scale.shape[-1]
    if groups <= 0 or (2 * half) % groups:
      raise ValueError(f"k_scale's last axis ({groups}) must divide head_dim={2 * half}")
    for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
      value = getattr(self, name)
      if tuple(value.shape) != (b, s, h, groups):
        raise ValueError(f"{name} must have shape {[b, s, h, groups]}, got {list(value.shape)}")


def _grouped_head_dim(x: jax.Array, group: int) -> jax.Array:
  d = x.shape[-1]
  if group <= 0 or group % 2 or d % group:
    raise ValueError(f"group must be an even divisor of head_dim={d}, got {group}")
  return x.reshape(*x.shape[:-1], d // group, group)


def quantize_kv_tensor(x: jax.Array, group: int | None = None):
  """One of K or V [B, S, Hkv, D] -> (packed uint8 [B, S, Hkv, D//2], scale, zero [B, S, Hkv, D//group])."""
  group = x.shape[-1] if group is None else group
  grouped = _grouped_head_dim(x, group)  # [B, S, Hkv, D // group, group]
  q, scale, zero = quantize_asymmetric(grouped, 4, axis=-1)
  packed = pack_int4(q.reshape(x.shape), axis=-1)
  return packed, scale[..., 0], zero[..., 0]


def dequantize_kv_tensor(packed: jax.Array, scale: jax.Array, zero: jax.Array, dtype=jnp.float32) -> jax.Array:
  codes = unpack_int4(packed, axis=-1, signed=False)  # [B, S, Hkv, D]
  d = codes.shape[-1]
  group = d // scale.shape[-1]
  grouped = codes.reshape(*codes.shape[:-1], d // group, group)
  x = dequantize_asymmetric(grouped, scale[..., None], zero[..., None])
  return x.reshape(codes.shape).astype(dtype)


def quantize_kv(k: jax.Array, v: jax.Array, group: int | None = None) -> QuantizedKV:
  """K and V [B, S, Hkv, D] float -> QuantizedKV (group = head_dim by default)."""
  if k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"k and v must share one [B, S, Hkv, D] shape, got {k.shape} and {v.shape}")
  kq, ks, kz = quantize_kv_tensor(k, group)
  vq, vs, vz = quantize_kv_tensor(v, group)
  return QuantizedKV(k=kq, v=vq, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz)


def dequantize_kv(kv: QuantizedKV, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """QuantizedKV -> (k, v) float [B, S, Hkv, D]."""
  return (dequantize_kv_tensor(kv.k, kv.k_scale, kv.k_zero, dtype),
          dequantize_kv_tensor(kv.v, kv.v_scale, kv.v_zero, dtype))

