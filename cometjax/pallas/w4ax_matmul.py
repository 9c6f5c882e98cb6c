"""W4Ax mixed-precision GEMM (Pallas Triton backend): y[M, N] = x_q[M, K] . w_q[K, N].

x_q is a `QuantizedActivation` (FMPQ: a leading INT8 region, then an INT4 region, a per-token scale per
block); w_q a 4-bit `QuantizedWeight` (packed along K, per-output-channel or group scales, symmetric or
with a float zero point per group). Pure W4A4 (no INT8 blocks) and pure W4A8 (all INT8) are the two ends
of the same kernel.

No INT4 MMA on Ampere/Hopper, so 4-bit operands are widened in registers with COMET's x16 trick: the
nibble is shifted into the high half of an int8 (value * 16, no sign-extension step), multiplied on
the int8 MMA (`jnp.dot(int8, int8, preferred_element_type=int32)`), and the 1/16 per 4-bit operand
is folded into the float scale. Exactness: |x16 * w16| <= 128 * 128, so int32 holds K < 131072.

Even/odd split: byte j of a K tile holds channels 2j (low nibble) and 2j+1 (high nibble) for weights
and INT4 activations alike, and the INT8 region is stored as separate even/odd channel planes, so a
tile is `x_even . w_low + x_odd . w_high`: two dots, no interleave in registers.

Scales: integer accumulation runs over a *segment* (a run of channels sharing one activation scale
and one weight scale: one activation block for per-channel weights, else gcd(group_size, block_size)
channels); at each segment end the int32 sum S is converted and scaled into the f32 accumulator:
  acc[m, n] += (S[m, n] - zero[g, n] * C[s, m]) * (x_scale[b, m] * w_scale[g, n])
with b the segment's block, g its weight group, and for asymmetric weights C the activation's code sum over
the segment (`QuantizedActivation.code_sums`, computed by quantize_act; QServe's zero-point term, here with a
float zero point). The reference below uses the same segments and the same order.

Grid: (M / block_m, N / block_n); each program walks all of K (Triton has no sequential grid axis to
accumulate over). M is padded inside the wrapper. The compiled kernel needs N % 16 == 0 and scale
segments (block_size, group_size) that are multiples of 64; `pallas_supported` says whether a weight
qualifies (`cometjax.ops` raises for an explicit "pallas" and falls back to XLA under "auto" when not).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cometjax.core.formats import QuantizedActivation, QuantizedWeight, check_activation
from cometjax.pallas.common import unpack_int4_x16

MAX_EXACT_K = 131072  # 2**31 / (128 * 128): the int32 accumulator of x16 operands cannot overflow
MIN_COMPILED_TILE = 16  # Triton MMA: every dot dimension >= 16
MIN_COMPILED_BLOCK_K = 64  # int8 MMA: K per dot (= block_k // 2 bytes) >= 32


@dataclasses.dataclass(frozen=True)
class W4AxMatmulTuning:
  """Tiles (powers of two) and Triton launch knobs; `resolve` fits them to a problem."""

  block_m: int = 64
  block_n: int = 128
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 3

  def resolve(self, m: int, n: int, segment: int, interpret: bool) -> W4AxMatmulTuning:
    """Shrinks tiles to the problem; compiled kernels keep the Triton minimums (M is padded)."""
    for name in ("block_m", "block_n", "block_k"):
      value = getattr(self, name)
      if value < 2 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 2, got {value}")
    block_m = min(self.block_m, pl.next_power_of_2(m))
    block_n = self.block_n
    while n % block_n and block_n > 1:
      block_n //= 2
    block_k = self.block_k
    while segment % block_k and block_k > 2:
      block_k //= 2
    if segment % block_k:
      raise ValueError(f"the scale segment ({segment} channels) must be even: block_size and group_size "
                       "must be even")
    if not interpret:
      block_m = max(block_m, MIN_COMPILED_TILE)
      if block_n < MIN_COMPILED_TILE:
        raise ValueError(f"out_features N={n} must be a multiple of {MIN_COMPILED_TILE} for the compiled kernel")
      if block_k < MIN_COMPILED_BLOCK_K:
        raise ValueError(f"block_size (and group_size) must be multiples of {MIN_COMPILED_BLOCK_K} for the "
                         f"compiled kernel (scale segment of {segment} channels); use the XLA path")
    return dataclasses.replace(self, block_m=block_m, block_n=block_n, block_k=block_k)


def pallas_supported(qw: QuantizedWeight) -> bool:
  """Whether the compiled kernel can tile this weight (else callers take the XLA path)."""
  if qw.bits != 4 or qw.activation is None or qw.in_features >= MAX_EXACT_K:
    return False
  try:
    W4AxMatmulTuning().resolve(1, qw.out_features, segment_length(qw), interpret=False)
  except ValueError:
    return False
  return True


def segment_length(qw: QuantizedWeight) -> int:
  """Channels sharing one activation and one weight scale (module doc): the block size for per-channel
  weights, else gcd(group_size, block_size)."""
  block = qw.activation.block_size
  return block if qw.group_size is None else math.gcd(qw.group_size, block)


# A float32 sum of integer products is exact below 2**24: |activation code| <= 127 times |weight code| <= 15
# (asymmetric INT4 codes reach 15) over one segment.
_EXACT_FLOAT_SUM = 1 << 24


def float_sums_are_exact(qw: QuantizedWeight) -> bool:
  """Whether `w4ax_matmul_reference(..., float_sums=True)` equals the int32 reference bit for bit."""
  return qw.bits == 4 and segment_length(qw) * 127 * 15 < _EXACT_FLOAT_SUM


def _w4ax_kernel(
    *refs,  # [int8_part [2, bm, K8 // 2]] [int4_part [bm, K4 // 2]] x_scales [num_blocks, bm]
            # [code_sums [K // segment, bm]] w [K // 2, bn] uint8, w_scales [G, bn] f32, [w_zeros [G, bn] f32],
            # out [bm, bn]
    int8_channels: int,
    int4_channels: int,
    block_size: int,
    segment: int,
    group_size: int | None,
    asymmetric: bool,
    block_k: int,
):
  refs = list(refs)
  int8_ref = refs.pop(0) if int8_channels else None
  int4_ref = refs.pop(0) if int4_channels else None
  x_scales_ref = refs.pop(0)
  sums_ref = refs.pop(0) if asymmetric else None
  w_ref, w_scales_ref = refs.pop(0), refs.pop(0)
  zeros_ref = refs.pop(0) if asymmetric else None
  (out_ref,) = refs
  block_m, block_n = out_ref.shape
  half_k = block_k // 2
  tiles_per_segment = segment // block_k

  def region(acc, first_channel, num_channels, load_x_tile, unscale):
    def segment_body(s, acc):
      segment_start = first_channel + s * segment

      def tile_body(t, acc_int):
        offset = s * segment + t * block_k  # channel offset inside the region
        x_even, x_odd = load_x_tile(offset // 2)  # int8 [bm, half_k] each
        w_rows = pl.ds((segment_start + t * block_k) // 2, half_k)
        w_even16, w_odd16 = unpack_int4_x16(w_ref[w_rows, :])  # int8 [half_k, bn] each
        acc_int += jnp.dot(x_even, w_even16, preferred_element_type=jnp.int32)
        acc_int += jnp.dot(x_odd, w_odd16, preferred_element_type=jnp.int32)
        return acc_int

      acc_int = jnp.zeros((block_m, block_n), jnp.int32)
      if tiles_per_segment == 1:  # keep one flat loop (Triton software-pipelines the innermost loop)
        acc_int = tile_body(0, acc_int)
      else:
        acc_int = lax.fori_loop(0, tiles_per_segment, tile_body, acc_int)
      group = 0 if group_size is None else segment_start // group_size
      x_scale = x_scales_ref[segment_start // block_size, :]  # [bm]
      w_scale = w_scales_ref[group, :].astype(jnp.float32)  # [bn]
      total = acc_int.astype(jnp.float32) * unscale  # exact: unscale is 1/16 or 1/256
      if asymmetric:
        code_sum = sums_ref[segment_start // segment, :].astype(jnp.float32)  # [bm]
        total = total - code_sum[:, None] * zeros_ref[group, :].astype(jnp.float32)[None, :]
      return acc + total * (x_scale[:, None] * w_scale[None, :])

    return lax.fori_loop(0, num_channels // segment, segment_body, acc)

  acc = jnp.zeros((block_m, block_n), jnp.float32)
  if int8_channels:
    def load_int8_tile(pair_offset):
      cols = pl.ds(pair_offset, half_k)
      return int8_ref[0, :, cols], int8_ref[1, :, cols]

    acc = region(acc, 0, int8_channels, load_int8_tile, 1.0 / 16)
  if int4_channels:
    def load_int4_tile(pair_offset):
      return unpack_int4_x16(int4_ref[:, pl.ds(pair_offset, half_k)])

    acc = region(acc, int8_channels, int4_channels, load_int4_tile, 1.0 / 256)
  out_ref[...] = acc.astype(out_ref.dtype)


def check_operands(qx: QuantizedActivation, qw: QuantizedWeight):
  """Raises ValueError unless qx and qw are a consistent activation / weight pair of one GEMM."""
  check_activation(qx)
  if not isinstance(qw, QuantizedWeight):
    raise ValueError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
  qw.check_arrays()
  if qw.activation is None:
    raise ValueError("qw.activation is None (weight-only); use dequantize_weight for A16 layers")
  if qx.format != qw.activation:
    raise ValueError(f"activation format mismatch: qx.format={qx.format} but qw.activation={qw.activation}")
  if qw.in_features >= MAX_EXACT_K:
    raise ValueError(f"in_features must be < {MAX_EXACT_K} for exact int32 accumulation, got {qw.in_features}")
  if qx.format.sum_group is not None and qx.format.sum_group != segment_length(qw):
    raise ValueError(f"qx.format.sum_group={qx.format.sum_group} must equal the GEMM segment "
                     f"{segment_length(qw)} (gcd(group_size, block_size))")


@functools.partial(
    jax.jit,
    static_argnames=["out_dtype", "block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret"],
)
def w4ax_matmul(
    qx: QuantizedActivation,  # M tokens, K channels (FMPQ layout)
    qw: QuantizedWeight,  # bits=4, [K, N]
    *,
    out_dtype=jnp.float32,
    block_m: int = W4AxMatmulTuning.block_m,
    block_n: int = W4AxMatmulTuning.block_n,
    block_k: int = W4AxMatmulTuning.block_k,
    num_warps: int = W4AxMatmulTuning.num_warps,
    num_stages: int = W4AxMatmulTuning.num_stages,
    interpret: bool = False,
) -> jax.Array:  # [M, N] out_dtype
  """The W4Ax GEMM as one Pallas kernel; tiles shrink to fit the problem (see W4AxMatmulTuning)."""
  check_operands(qx, qw)
  if qw.bits != 4:
    raise ValueError(f"w4ax_matmul needs a 4-bit weight (bits=4), got bits={qw.bits}; "
                     "use w4ax_matmul_reference for 8-bit weights")
  if qw.layout != "kn":
    raise ValueError(f"w4ax_matmul reads the weight as [K // 2, N] (layout 'kn'), got layout={qw.layout!r}; "
                     "pass qw.with_layout('kn')")
  fmt = qx.format
  m = qx.int4_part.shape[0]
  k, n = qw.shape
  segment = segment_length(qw)
  tuning = W4AxMatmulTuning(block_m, block_n, block_k, num_warps, num_stages).resolve(m, n, segment, interpret)
  bm, bn = tuning.block_m, tuning.block_n
  padded_m = pl.cdiv(m, bm) * bm
  pad_rows = padded_m - m

  operands, in_specs = [], []
  if fmt.int8_channels:
    operands.append(jnp.pad(qx.int8_part, ((0, 0), (0, pad_rows), (0, 0))))
    in_specs.append(pl.BlockSpec((2, bm, fmt.int8_channels // 2), lambda i, j: (0, i, 0)))
  if fmt.int4_channels:
    operands.append(jnp.pad(qx.int4_part, ((0, pad_rows), (0, 0))))
    in_specs.append(pl.BlockSpec((bm, fmt.int4_channels // 2), lambda i, j: (i, 0)))
  operands.append(jnp.pad(qx.scales, ((0, 0), (0, pad_rows))))
  in_specs.append(pl.BlockSpec((fmt.num_blocks, bm), lambda i, j: (0, i)))
  if qw.asymmetric:
    operands.append(jnp.pad(qx.code_sums, ((0, 0), (0, pad_rows))))
    in_specs.append(pl.BlockSpec((fmt.num_sum_groups, bm), lambda i, j: (0, i)))
  operands += [qw.data, qw.scales]
  in_specs += [pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)),
               pl.BlockSpec((qw.num_scale_groups, bn), lambda i, j: (0, j))]
  if qw.asymmetric:
    operands.append(qw.zero_points())  # f32 [G, N] whether stored float or packed integer
    in_specs.append(pl.BlockSpec((qw.num_scale_groups, bn), lambda i, j: (0, j)))
  kernel = functools.partial(
      _w4ax_kernel, int8_channels=fmt.int8_channels, int4_channels=fmt.int4_channels, block_size=fmt.block_size,
      segment=segment, group_size=qw.group_size, asymmetric=qw.asymmetric, block_k=tuning.block_k)
  out = pl.pallas_call(
      kernel,
      grid=(padded_m // bm, n // bn),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
      name="w4ax_matmul",
  )(*operands)
  return out[:m]


@functools.partial(jax.jit, static_argnames=["out_dtype", "float_sums"])
def w4ax_matmul_reference(
    qx: QuantizedActivation,
    qw: QuantizedWeight,  # bits=4 or 8
    out_dtype=jnp.float32,
    *,
    float_sums: bool = False,
) -> jax.Array:  # [M, N]
  """Plain-jnp W4Ax / W8Ax GEMM with the kernel's segments: exact int32 sums, f32 scaling in K order.

  float_sums=True runs each segment's integer dot as a float32 matmul (faster than int8 dots on CPU); it is
  bit for bit the same only while the sums stay below 2**24 (`float_sums_are_exact`)."""
  check_operands(qx, qw)
  fmt = qx.format
  m = qx.int4_part.shape[0]
  k, n = qw.shape
  segment = segment_length(qw)
  num_segments = k // segment
  x_values = jnp.concatenate(qx.int_values(), axis=1)  # int8 [M, K]
  x_seg = x_values.reshape(m, num_segments, segment).transpose(1, 0, 2)  # [S, M, seg]
  w_seg = qw.int_values().reshape(num_segments, segment, n)  # [S, seg, N]
  starts = segment * jnp.arange(num_segments)
  groups = jnp.zeros_like(starts) if qw.group_size is None else starts // qw.group_size
  x_scales = qx.scales[starts // fmt.block_size]  # [S, M]
  w_scales = qw.scales.astype(jnp.float32)[groups]  # [S, N]
  zeros = None if qw.zeros is None else qw.zero_points()[groups]  # [S, N]
  code_sums = None if qw.zeros is None else qx.code_sums.astype(jnp.float32)  # [S, M]

  def add_segment(acc, operands):  # one [M, N] term at a time: no [S, M, N] buffer
    x_s, w_s, x_scale, w_scale, zero, code_sum = operands
    if float_sums:
      total = jnp.dot(x_s.astype(jnp.float32), w_s.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    else:
      total = jnp.dot(x_s, w_s, preferred_element_type=jnp.int32).astype(jnp.float32)
    if zero is not None:
      total = total - code_sum[:, None] * zero[None, :]
    return acc + total * (x_scale[:, None] * w_scale[None, :]), None

  y, _ = lax.scan(add_segment, jnp.zeros((m, n), jnp.float32), (x_seg, w_seg, x_scales, w_scales, zeros, code_sums))
  return y.astype(out_dtype)
