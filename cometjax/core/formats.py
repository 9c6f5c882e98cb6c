"""The quantized linear-weight leaves and the FMPQ activation layout. Kernels in `cometjax.pallas` read
exactly these layouts; `cometjax.ops.linear` dispatches on the leaf type.

FMPQ activations (`ActivationFormat`, `QuantizedActivation`)
  The K input channels of a linear layer, after the channel permutation `perm` (x_perm = x[..., perm]),
  are split into `num_blocks` blocks of `block_size` channels; the first `num_int8_blocks` blocks run at
  INT8, the rest at INT4. Every block has its own symmetric per-token scale (max|x| over the block's
  channels / 127 or / 7; `scale_span="region"`, format version 2, shares one scale over each precision region
  and repeats it in every block of the region). With K8 = int8_channels and K4 = int4_channels, a quantized
  activation of M tokens holds
    int8_part  int8  [2, M, K8 // 2]  [0] = even channels 0, 2, 4, ... of the INT8 region, [1] = odd ones
    int4_part  uint8 [M, K4 // 2]     pack_int4 of the INT4 region along channels
    scales     f32   [num_blocks, M]  scales[b, m]: token m's scale of block b (block-major: a GEMM reads
                                      one contiguous row per block)
    code_sums  int32 [K // sum_group, M] or None: per token, the sum of the integer codes over each run of
                                      `sum_group` channels (sum_group divides block_size); only formats of
                                      layers with asymmetric weights carry it (the zero-point term)
  The even/odd split matches the weight packing (rows 2i / 2i+1 in one byte), so the matmul kernel
  multiplies even channels with low nibbles and odd channels with high nibbles and never interleaves.

Weights (`QuantizedWeight`, `quantize_weight`)
  Layout [in=K, out=N]. bits=4: `data` uint8 [K // 2, N], pack_int4 along K (row 2i low nibble, row
  2i+1 high nibble); bits=8: int8 [K, N]. `layout="nk"` stores the same bytes transposed ([N, K // 2] or
  [N, K]): K-major, as Hopper's int8 wgmma reads its B operand (`with_layout` converts). `scales`
  [K // group_size, N] or [1, N] per output channel (f32, or f16/bf16 to store less; used as f32).
  Symmetric: w ~= scale * q. Asymmetric (`zeros` set): w ~= scale * (q - zero) with a zero point per group,
  q in [-8, 7] (`cometjax.core.numerics.quantize_asymmetric_signed`): a float zero shaped like `scales` (in a
  scale dtype), or an integer zero in [-8, 7] packed two per byte along N (uint8 [G, ceil(N / 2)], low nibble
  = even column; `pack_zero_points`), the format GPTQ and QServe store; `zero_points()` reads either. The GEMM adds
  -scale * zero * (sum of the activation codes over the group) per group, so the activation format must carry
  code sums over runs of gcd(group_size, block_size) channels (block_size for per-channel weights).
  Rows of `data` are already in permuted order (row r holds original input channel perm[r]), and scale
  groups are contiguous in that permuted order. `perm` int32 [K] or None (identity).
  `dequantize_weight(qw)` returns the float weight in permuted row order (pair with x[..., perm]);
  `dequantize_weight(qw, original_order=True)` undoes the permutation (pair with x).
  `activation=None` is weight-only (A16): the weight is dequantized and multiplied in float.

Input transforms (`InputTransformWeight`)
  A QuantizedWeight whose input is first zero-padded, rotated and/or permuted (see the class).

Static activations (`StaticActQuantWeight`)
  The diffusion models' integer leaf: a packed weight with one static (step, zero point) activation
  quantizer (`cometjax.core.numerics.quantize_static`) and the weight's column sums for the zero point.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from cometjax.core.numerics import (pack_int4, quantize_asymmetric_signed, quantize_static, quantize_symmetric,
                                    unpack_int4)
from cometjax.core.rotations import HadamardRotation, apply_block_rotation

# ------------------------------------------------------------------------------------------------
# FMPQ activation format


SCALE_SPANS = ("block", "region")


@dataclasses.dataclass(frozen=True)
class ActivationFormat:
  """Mixed INT8/INT4 activation plan of one linear layer (static, hashable)."""

  block_size: int
  num_int8_blocks: int
  num_blocks: int
  scale_span: str = "block"  # "block": a per-token scale per block; "region": one per precision region (v2)
  sum_group: int | None = None  # channels per per-token code sum (asymmetric weights); None: no sums

  def __post_init__(self):
    if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 2:
      raise ValueError(f"block_size must be a positive even int, got {self.block_size!r}")
    if not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
      raise ValueError(f"num_blocks must be a positive int, got {self.num_blocks!r}")
    if not isinstance(self.num_int8_blocks, int) or not 0 <= self.num_int8_blocks <= self.num_blocks:
      raise ValueError(f"num_int8_blocks must be an int in [0, num_blocks={self.num_blocks}], "
                       f"got {self.num_int8_blocks!r}")
    if self.scale_span not in SCALE_SPANS:
      raise ValueError(f"scale_span must be one of {SCALE_SPANS}, got {self.scale_span!r}")
    if self.sum_group is not None and (not isinstance(self.sum_group, int) or self.sum_group <= 0
                                       or self.sum_group % 2 or self.block_size % self.sum_group):
      raise ValueError(f"sum_group must be None or an even divisor of block_size={self.block_size}, "
                       f"got {self.sum_group!r}")

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

  @property
  def num_sum_groups(self) -> int:
    return 0 if self.sum_group is None else self.in_features // self.sum_group

  def with_sums(self, sum_group: int | None) -> "ActivationFormat":
    return dataclasses.replace(self, sum_group=sum_group)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedActivation:
  """Activations of M tokens in the FMPQ mixed layout (see the module docstring)."""

  int8_part: jax.Array  # int8 [2, M, K8 // 2]
  int4_part: jax.Array  # uint8 [M, K4 // 2]
  scales: jax.Array  # f32 [num_blocks, M]
  code_sums: jax.Array | None  # int32 [K // sum_group, M] or None
  format: ActivationFormat = dataclasses.field(metadata=dict(static=True))

  @property
  def num_tokens(self) -> int:
    return self.int4_part.shape[0]

  def int_values(self) -> tuple[jax.Array, jax.Array]:
    """(int8 codes [M, K8], int8 codes [M, K4]) of the two regions in channel order."""
    even, odd = self.int8_part[0], self.int8_part[1]  # [M, K8 // 2] each
    int8_values = jnp.stack([even, odd], axis=-1).reshape(even.shape[0], 2 * even.shape[1])
    return int8_values, unpack_int4(self.int4_part, axis=-1)

  def channel_scales(self) -> jax.Array:
    """f32 [M, K]: each channel's per-token scale (its block's)."""
    return jnp.repeat(self.scales.T, self.format.block_size, axis=1)

  def dequantize(self) -> jax.Array:
    """Float activations [M, K] in permuted channel order."""
    codes = jnp.concatenate(self.int_values(), axis=-1).astype(jnp.float32)
    return codes * self.channel_scales()


def check_activation(qx: QuantizedActivation) -> None:
  """Raises ValueError when the arrays of `qx` disagree with its format."""
  if not isinstance(qx, QuantizedActivation):
    raise ValueError(f"qx must be a QuantizedActivation, got {type(qx).__name__}")
  fmt = qx.format
  m = qx.int4_part.shape[0]
  expected = {"int8_part": (2, m, fmt.int8_channels // 2), "int4_part": (m, fmt.int4_channels // 2),
              "scales": (fmt.num_blocks, m)}
  if fmt.sum_group is not None:
    expected["code_sums"] = (fmt.num_sum_groups, m)
  elif qx.code_sums is not None:
    raise ValueError("qx.code_sums must be None for a format without sum_group")
  for name, shape in expected.items():
    value = getattr(qx, name)
    if value is None:
      raise ValueError(f"qx.{name} is None but the format (sum_group={fmt.sum_group}) needs shape {list(shape)}")
    if tuple(value.shape) != shape:
      raise ValueError(f"qx.{name} must have shape {list(shape)}, got {list(value.shape)}")


# ------------------------------------------------------------------------------------------------
# Quantized weights

WEIGHT_LAYOUTS = ("kn", "nk")


class _WeightShape:
  """in_features / out_features of a weight leaf with a static `shape` (in, out)."""

  @property
  def in_features(self) -> int:
    return self.shape[0]

  @property
  def out_features(self) -> int:
    return self.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight(_WeightShape):
  """A quantized linear weight [in=K, out=N] plus the activation plan of its layer."""

  data: jax.Array  # bits=4: uint8 [K // 2, N]; bits=8: int8 [K, N]; rows in permuted order
  scales: jax.Array  # f32 (or f16 / bf16) [K // group_size, N] or [1, N]
  perm: jax.Array | None  # int32 [K] or None (identity)
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int | None = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  activation: ActivationFormat | None = dataclasses.field(default=None, metadata=dict(static=True))
  layout: str = dataclasses.field(default="kn", metadata=dict(static=True))  # "kn": data [K.., N]; "nk": [N, K..]
  # asymmetric weights: float zero points shaped like scales, or integer ones packed uint8 [G, ceil(N / 2)]
  zeros: jax.Array | None = None
  def __post_init__(self):
    # Only static fields are checked here: jax rebuilds this class with placeholder leaves.
    if self.layout not in WEIGHT_LAYOUTS:
      raise ValueError(f"layout must be one of {WEIGHT_LAYOUTS}, got {self.layout!r}")
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
  def num_scale_groups(self) -> int:
    return 1 if self.group_size is None else self.in_features // self.group_size

  @property
  def asymmetric(self) -> bool:
    return self.zeros is not None

  @property
  def integer_zeros(self) -> bool:
    """Asymmetric with integer zero points stored packed (4 bits each), not float ones."""
    return self.zeros is not None and jnp.dtype(self.zeros.dtype) == jnp.uint8

  @property
  def packed_zeros_shape(self) -> tuple[int, int]:
    """[G, ceil(N / 2)]: the uint8 array integer zero points are stored in."""
    return (self.num_scale_groups, -(-self.out_features // 2))

  def zero_points(self) -> jax.Array | None:
    """f32 [G, N]: the zero point of every scale group (None for symmetric weights), whichever way stored."""
    if self.zeros is None:
      return None
    if self.integer_zeros:
      return unpack_int4(self.zeros, axis=-1)[:, :self.out_features].astype(jnp.float32)
    return self.zeros.astype(jnp.float32)

  def required_sum_group(self) -> int | None:
    """The code-sum run the activation format must carry: None for symmetric weights, else gcd(group_size,
    block_size) (block_size for per-channel weights): the runs sharing one activation and one weight scale."""
    if self.zeros is None or self.activation is None:
      return None
    block = self.activation.block_size
    return block if self.group_size is None else math.gcd(self.group_size, block)

  def check_arrays(self) -> None:
    """Raises ValueError when the array fields disagree with the static fields."""
    k, n = self.shape
    data_shape = (k // 2, n) if self.bits == 4 else (k, n)
    if self.layout == "nk":
      data_shape = data_shape[::-1]
    data_dtype = jnp.uint8 if self.bits == 4 else jnp.int8
    if tuple(self.data.shape) != data_shape or self.data.dtype != data_dtype:
      raise ValueError(f"data must be {jnp.dtype(data_dtype).name} {list(data_shape)} for bits={self.bits}, "
                       f"layout={self.layout!r}, got {self.data.dtype} {list(self.data.shape)}")
    if tuple(self.scales.shape) != (self.num_scale_groups, n):
      raise ValueError(f"scales must have shape {[self.num_scale_groups, n]} for group_size="
                       f"{self.group_size}, got {list(self.scales.shape)}")
    if jnp.dtype(self.scales.dtype) not in SCALE_DTYPES:
      raise ValueError(f"scales must be one of {[d.name for d in SCALE_DTYPES]}, got {self.scales.dtype}")
    packed_zeros = self.packed_zeros_shape
    if self.zeros is not None and not (
        (tuple(self.zeros.shape) == tuple(self.scales.shape) and jnp.dtype(self.zeros.dtype) in SCALE_DTYPES)
        or (tuple(self.zeros.shape) == packed_zeros and self.integer_zeros)):
      raise ValueError(f"zeros must be a float array shaped like scales {list(self.scales.shape)} or packed "
                       f"integer zero points uint8 {list(packed_zeros)}, got {self.zeros.dtype} "
                       f"{list(self.zeros.shape)}")
    wanted = self.required_sum_group()
    if self.activation is not None and self.activation.sum_group != wanted:
      raise ValueError(f"activation.sum_group must be {wanted} for this weight (zeros "
                       f"{'set' if self.zeros is not None else 'None'}, group_size={self.group_size}, block_size="
                       f"{self.activation.block_size}), got {self.activation.sum_group}")
    if self.perm is not None and tuple(self.perm.shape) != (k,):
      raise ValueError(f"perm must have shape [{k}], got {list(self.perm.shape)}")

  def check_input(self, x: jax.Array) -> None:
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x must have {self.in_features} channels in its last axis, got shape {x.shape}")

  def int_values(self) -> jax.Array:
    """Integer weight values int8 [K, N] in permuted row order (whatever the layout)."""
    data = self.data if self.layout == "kn" else self.data.T
    return unpack_int4(data, axis=0) if self.bits == 4 else data

  def with_layout(self, layout: str) -> "QuantizedWeight":
    """The same weight with its data stored in `layout` ("kn" or "nk")."""
    if layout not in WEIGHT_LAYOUTS:
      raise ValueError(f"layout must be one of {WEIGHT_LAYOUTS}, got {layout!r}")
    if layout == self.layout:
      return self
    return dataclasses.replace(self, data=self.data.T, layout=layout)

  def permute_input(self, x: jax.Array) -> jax.Array:
    return x if self.perm is None else jnp.take(x, self.perm, axis=-1)

  @property
  def nbytes(self) -> int:
    """Bytes of every array the weight stores (codes, scales, zero points, permutation)."""
    return sum(int(a.nbytes) for a in (self.data, self.scales, self.zeros, self.perm) if a is not None)


SCALE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def pack_zero_points(zeros: jax.Array) -> jax.Array:
  """Integer zero points [G, N] in [-8, 7] -> uint8 [G, ceil(N / 2)], two per byte along N (an odd N gets a
  zero nibble); `QuantizedWeight.zero_points` unpacks."""
  zeros = jnp.asarray(zeros)
  values = zeros.astype(jnp.float32)
  if zeros.ndim != 2 or bool(jnp.any((values != jnp.round(values)) | (values < -8) | (values > 7))):
    raise ValueError(f"integer zero points must be a 2-D array of integers in [-8, 7], got {zeros.dtype} "
                     f"{list(zeros.shape)}")
  values = jnp.pad(values.astype(jnp.int8), ((0, 0), (0, zeros.shape[1] % 2)))
  return pack_int4(values, axis=-1)


def quantize_weight(w: jax.Array, bits: int = 4, group_size: int | None = None,
                    activation: ActivationFormat | None = None, perm: jax.Array | None = None,
                    clip_ratio: float = 1.0, symmetric: bool = True) -> QuantizedWeight:
  """Round-to-nearest quantization of a float weight [K, N] ([in, out] layout): symmetric, or asymmetric with a
  float zero point per group (`symmetric=False`; the activation format then gets the code sums it needs).

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
  g = 1 if group_size is None else k // group_size
  grouped = w.reshape(g, k // g, n)
  zeros = None
  if symmetric:
    q, scales = quantize_symmetric(grouped, bits, axis=1, clip_ratio=clip_ratio)
  else:
    q, scales, zeros = quantize_asymmetric_signed(grouped, bits, axis=1, clip_ratio=clip_ratio)
    zeros = zeros.reshape(g, n)
  q, scales = q.reshape(k, n), scales.reshape(g, n)
  data = pack_int4(q, axis=0) if bits == 4 else q
  qw = QuantizedWeight(data=data, scales=scales.astype(jnp.float32), perm=perm, bits=bits,
                       group_size=group_size, shape=(k, n), zeros=zeros)
  return with_activation(qw, activation)


def with_activation(qw: QuantizedWeight, activation: ActivationFormat | None) -> QuantizedWeight:
  """qw with the activation plan `activation`, its code sums set to what qw's zero points need."""
  if activation is None:
    return dataclasses.replace(qw, activation=None)
  bare = dataclasses.replace(qw, activation=activation.with_sums(None))
  return dataclasses.replace(qw, activation=activation.with_sums(bare.required_sum_group()))


def dequantize_weight(qw: QuantizedWeight, original_order: bool = False, dtype=jnp.float32) -> jax.Array:
  """Float weight [K, N]: permuted row order by default, the original order with original_order=True."""
  k, n = qw.shape
  values = qw.int_values().astype(jnp.float32)  # [K, N]
  groups = k // qw.scales.shape[0]
  if qw.zeros is not None:
    values = values - jnp.repeat(qw.zero_points(), groups, axis=0)
  w = values * jnp.repeat(qw.scales.astype(jnp.float32), groups, axis=0)
  if original_order and qw.perm is not None:
    w = jnp.zeros_like(w).at[qw.perm].set(w)
  return w.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DequantizedWeight(_WeightShape):
  """A `QuantizedWeight` held as its float weight, for a loop that multiplies with it many times (a CPU
  decode loop dequantizes once per call, not once per step). The matmul quantizes its input to the same
  activation plan and multiplies the dequantized operands in float32: the integer GEMM's products up to
  float32 rounding. An execution form only: never saved.

  input_matrix (`dequantized_leaf(fold_input=True)`): the whole input transform of an
  `InputTransformWeight` (pad, rotations, permutations) as one f32 [K, Kp] matrix, so x @ input_matrix is
  the input the activation plan quantizes; perm is then None. One small product in place of a chain of
  gathers, butterflies and concatenations, each a separate kernel call on a CPU.

  joint_weight (`with_joint_weight`): on the first of several projections that share this input (q / k / v),
  all their weights side by side, so `ops.linears` runs the group as one product; joint_slot: each one's
  place in that group."""

  weight: jax.Array  # f32 [Kp, N], rows in permuted order
  perm: jax.Array | None  # int32 [Kp] or None (identity)
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))  # (K, N)
  activation: ActivationFormat | None = dataclasses.field(default=None, metadata=dict(static=True))
  input_matrix: jax.Array | None = None  # f32 [K, Kp]
  joint_weight: jax.Array | None = None  # f32 [Kp, sum(joint_outputs)]
  joint_outputs: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))  # N of each
  joint_slot: int | None = dataclasses.field(default=None, metadata=dict(static=True))


# Input transforms are folded into one matrix (`dequantized_leaf(fold_input=True)`) up to this many input
# channels: there a decode step's cost is kernel calls, not arithmetic; above it the K x Kp product would
# cost a sizable fraction of the layer's own (576 x 576 for SmolLM2's q/k/v is 60% of their weights).
FOLD_INPUT_MAX_FEATURES = 256


def dequantized_leaf(leaf, fold_input: bool = False):
  """A QuantizedWeight (also inside an InputTransformWeight) as a DequantizedWeight; other leaves as given.

  fold_input: an InputTransformWeight of at most FOLD_INPUT_MAX_FEATURES inputs becomes one DequantizedWeight
  whose `input_matrix` is its transform (traceable: the matrix is the transform of the identity). Its
  activations then equal the unfolded path's up to float32 rounding of the rotation (a value on a rounding
  tie may take the neighbouring code); unfolded, they are bit for bit the packed path's."""
  if isinstance(leaf, InputTransformWeight):
    inner = dequantized_leaf(leaf.inner)
    if not fold_input or leaf.in_features > FOLD_INPUT_MAX_FEATURES or inner.activation is None:
      return dataclasses.replace(leaf, inner=inner)
    matrix = leaf.transform_input(jnp.eye(leaf.in_features, dtype=jnp.float32))  # [K, Kp]
    if inner.perm is not None:
      matrix = jnp.take(matrix, inner.perm, axis=1)
    return dataclasses.replace(inner, perm=None, shape=leaf.shape, input_matrix=matrix)
  if isinstance(leaf, QuantizedWeight):
    return DequantizedWeight(weight=dequantize_weight(leaf), perm=leaf.perm, shape=leaf.shape,
                             activation=leaf.activation)
  return leaf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class InputTransformWeight:
  """A QuantizedWeight whose input is transformed first:

  x [..., in_features] -> zero-pad to Kp -> rotate by `rotation` -> x[..., perm] -> rotate the channels from
  region_start on by `region` -> the inner weight's matmul. Every part is optional.

  `rotation` is the online rotation of rotation="hadamard" (down_proj's input): a `HadamardRotation` (one
  signed Hadamard block over Kp, applied as a fast transform; Kp bytes stored), or a dense f32 [Kp, Kp]
  matrix (format version 2). `perm` + `region` are FMPQ's INT4-region rotation (identity on the INT8
  channels): a `HadamardRotation` over the rotated channels (one block per FMPQ block, or one over the whole
  region), or dense f32 chunks [num_chunks, b, b] (format version 2, and the diffusion models' rotation).
  """
  inner: QuantizedWeight
  rotation: jax.Array | HadamardRotation | None
  in_features: int = dataclasses.field(metadata=dict(static=True))
  perm: jax.Array | None = None  # int32 [Kp]
  region: jax.Array | HadamardRotation | None = None
  region_start: int = dataclasses.field(default=0, metadata=dict(static=True))

  def __post_init__(self):
    if self.in_features > self.inner.in_features:
      raise ValueError(f"in_features={self.in_features} exceeds the inner weight's {self.inner.in_features}")

  @property
  def shape(self) -> tuple[int, int]:
    return (self.in_features, self.inner.out_features)

  def transform_input(self, x: jax.Array) -> jax.Array:
    """x [..., in_features] -> [..., Kp], the input the inner weight multiplies."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x must have {self.in_features} channels in its last axis, got shape {x.shape}")
    pad = self.inner.in_features - self.in_features
    if pad:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    if isinstance(self.rotation, HadamardRotation):
      x = self.rotation.apply(x)
    elif self.rotation is not None:
      x = jnp.dot(x, self.rotation.astype(x.dtype))
    if self.perm is not None:
      x = jnp.take(x, self.perm, axis=-1)
    if self.region is not None:
      head, tail = x[..., :self.region_start], x[..., self.region_start:]
      tail = self.region.apply(tail) if isinstance(self.region, HadamardRotation) else (
          apply_block_rotation(tail, self.region))
      x = jnp.concatenate([head, tail], axis=-1)
    return x

  @property
  def transform_nbytes(self) -> int:
    """Bytes stored for the input transform (signs, dense matrices, the permutation)."""
    total = 0
    for part in (self.rotation, self.perm, self.region):
      if isinstance(part, HadamardRotation):
        total += part.nbytes
      elif part is not None:
        total += int(part.nbytes)
    return total

  @property
  def rotation_nbytes(self) -> int:
    """Bytes of the rotations alone (the permutation excluded)."""
    perm = 0 if self.perm is None else int(self.perm.nbytes)
    return self.transform_nbytes - perm


def _input_parts(leaf) -> tuple[tuple, tuple]:
  """(static description, arrays) of everything a W4Ax leaf does to its input before its own product:
  the input transform (pad, rotations, permutation) and the inner weight's permutation, folded input matrix
  and activation plan."""
  transform, inner = (leaf, leaf.inner) if isinstance(leaf, InputTransformWeight) else (None, leaf)
  parts = (None, None, None) if transform is None else (transform.rotation, transform.perm, transform.region)
  arrays = []
  kinds = []
  for part in parts + (inner.perm, getattr(inner, "input_matrix", None)):
    if isinstance(part, HadamardRotation):
      kinds.append(("hadamard", part.block))
      arrays.append(part.signs)
    else:
      kinds.append(None if part is None else ("array", tuple(part.shape), str(part.dtype)))
      arrays.append(part)
  static = (type(inner).__name__, inner.in_features, inner.activation, tuple(kinds),
            None if transform is None else (transform.in_features, transform.region_start))
  return static, tuple(arrays)


def _same_input_plan(a, b, same_array) -> bool:
  """Both leaves quantize their input (W4Ax, held or packed) with equal static plans, and every input array
  pair passes `same_array`."""
  if not all(isinstance(inner_weight(leaf), (QuantizedWeight, DequantizedWeight))
             and inner_weight(leaf).activation is not None for leaf in (a, b)):
    return False
  (static_a, arrays_a), (static_b, arrays_b) = _input_parts(a), _input_parts(b)
  return static_a == static_b and all(x is y or (x is not None and y is not None and same_array(x, y))
                                      for x, y in zip(arrays_a, arrays_b))


def reads_the_same_input(a, b) -> bool:
  """Whether two weight leaves turn one input into the same quantized activations (concrete arrays: call
  outside jit): the same input transform, permutation and activation plan, as q / k / v or gate / up
  calibrated on one input have. Float and weight-only leaves never do (they quantize no input)."""
  return _same_input_plan(a, b, lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))))


def shares_input_arrays(a, b) -> bool:
  """Whether two leaves read their input through the very same array objects and the same static plan
  (traceable: compares identities, as `with_input_arrays_of` leaves them), so one quantized input serves both."""
  return _same_input_plan(a, b, lambda x, y: False)


def is_held(leaf) -> bool:
  """Whether a weight leaf is a `DequantizedWeight`, alone or inside an `InputTransformWeight`."""
  return isinstance(inner_weight(leaf), DequantizedWeight)


def with_joint_weight(leaves: list) -> list:
  """Held leaves (or ones wrapping them) of projections `with_input_arrays_of` made share one input, the first
  holding all their weights side by side (`DequantizedWeight.joint_weight`) and each its place among them
  (`joint_slot`), so `ops.linears` can tell a call in that order (which it runs as one product) from others."""
  rewrap = lambda leaf, held: dataclasses.replace(leaf, inner=held) if isinstance(leaf, InputTransformWeight) else held
  held = [inner_weight(leaf) for leaf in leaves]
  out = [rewrap(leaf, dataclasses.replace(h, joint_slot=i)) for i, (leaf, h) in enumerate(zip(leaves, held))]
  first = dataclasses.replace(inner_weight(out[0]), joint_weight=jnp.concatenate([h.weight for h in held], axis=1),
                              joint_outputs=tuple(h.shape[1] for h in held))
  return [rewrap(out[0], first)] + out[1:]


def with_input_arrays_of(leaf, leader):
  """`leaf` reading its input through `leader`'s very arrays (transform, permutation): for leaves
  `reads_the_same_input` paired, so that `shares_input_arrays` holds and `ops.linears` quantizes the shared
  input once. Traceable; the caller has checked the pairing."""
  if isinstance(leaf, InputTransformWeight):
    inner = with_input_arrays_of(leaf.inner, leader.inner)
    return dataclasses.replace(leaf, inner=inner, rotation=leader.rotation, perm=leader.perm, region=leader.region)
  if isinstance(leaf, DequantizedWeight):
    return dataclasses.replace(leaf, perm=leader.perm, input_matrix=leader.input_matrix)
  return dataclasses.replace(leaf, perm=leader.perm)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticActQuantWeight:
  """Packed INT4/INT8 weight + a static activation quantizer (the diffusion models' integer leaf).

  `act_step` / `act_zero` are scalars already chosen for the current timestep group.
  """

  data: jax.Array  # uint8 [K_pad // 2, N] (INT4, packed, K padded to even) or int8 [K, N] (INT8)
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
      return unpack_int4(self.data, axis=0)[: self.in_features]
    return self.data

  def quantize_input(self, x: jax.Array) -> jax.Array:  # [..., K] -> int8 [..., K]
    if x.shape[-1] != self.in_features:
      raise ValueError(f"x last dim must be in_features={self.in_features}, got shape {x.shape}")
    return quantize_static(x, self.act_step, self.act_zero, self.act_bits)


def pack_static_weight(weight_int: jax.Array, weight_scale: jax.Array, act_step, act_zero, *, weight_bits: int,
                       act_bits: int) -> StaticActQuantWeight:
  """weight_int: integer-valued [K, N]; weight_scale: [N]. 4-bit weights with odd K get a zero row."""
  in_features = weight_int.shape[0]
  weight_int = weight_int.astype(jnp.int8)
  if weight_bits <= 4:
    data = pack_int4(jnp.pad(weight_int, ((0, in_features % 2), (0, 0))), axis=0)
  else:
    data = weight_int
  return StaticActQuantWeight(
      data=data, weight_scale=weight_scale.reshape(1, -1).astype(jnp.float32),
      column_sums=weight_int.astype(jnp.int32).sum(0), act_step=jnp.asarray(act_step, jnp.float32),
      act_zero=jnp.asarray(act_zero, jnp.float32), in_features=in_features, weight_bits=weight_bits,
      act_bits=act_bits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedEmbedding:
  """A token embedding [V, d] stored as INT8 with one symmetric scale per row (per vocabulary entry).

  `lookup(tokens)` dequantizes the rows it gathers; `logits(x)` is a tied classifier x @ E^T, computed as
  (x @ codes^T) * scale per vocabulary entry, so the table is never dequantized whole.
  """

  data: jax.Array  # int8 [V, d]
  scales: jax.Array  # f32 (or f16 / bf16) [V]

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.data.shape)

  def lookup(self, tokens: jax.Array, dtype=jnp.float32) -> jax.Array:  # int [...] -> [..., d]
    rows = jnp.take(self.data, tokens, axis=0).astype(jnp.float32)
    return (rows * jnp.take(self.scales, tokens, axis=0).astype(jnp.float32)[..., None]).astype(dtype)

  def logits(self, x: jax.Array) -> jax.Array:  # [..., d] -> [..., V]
    return jnp.dot(x, self.data.T.astype(x.dtype)) * self.scales.astype(x.dtype)

  def dequantize(self) -> jax.Array:
    return self.data.astype(jnp.float32) * self.scales.astype(jnp.float32)[:, None]

  @property
  def nbytes(self) -> int:
    return int(self.data.nbytes + self.scales.nbytes)


def quantize_embedding(table: jax.Array, scale_dtype=jnp.float32) -> QuantizedEmbedding:
  """INT8 per-row symmetric quantization of an embedding table [V, d] (round half up, max|row| / 127)."""
  table = jnp.asarray(table, jnp.float32)
  if table.ndim != 2:
    raise ValueError(f"an embedding table must be [vocab, dim], got shape {table.shape}")
  scales = jnp.asarray(quantize_symmetric(table, 8, axis=1)[1][:, 0]).astype(scale_dtype)
  q = jnp.clip(jnp.floor(table / scales.astype(jnp.float32)[:, None] + 0.5), -127, 127).astype(jnp.int8)
  return QuantizedEmbedding(data=q, scales=scales)


QUANTIZED_LEAF_TYPES = (QuantizedWeight, InputTransformWeight, StaticActQuantWeight, QuantizedEmbedding)


def is_quantized_leaf(value) -> bool:
  """Whether `value` is one of the quantized weight leaves above (not a float array)."""
  return isinstance(value, QUANTIZED_LEAF_TYPES)


def inner_weight(leaf):
  """The QuantizedWeight (or held DequantizedWeight) a (possibly input-transformed) leaf multiplies by."""
  return leaf.inner if isinstance(leaf, InputTransformWeight) else leaf
