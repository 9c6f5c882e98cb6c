"""Fused channel permutation + per-token FMPQ quantization of activations (Pallas Triton backend).

x [M, K] (bf16/f32) -> `QuantizedActivation` (layout in `cometjax.core.formats`): the permuted INT8 region
as int8 [2, M, K8 // 2] (even / odd channels), the INT4 region as packed uint8 [M, K4 // 2], one symmetric
per-token scale per block (f32 [num_blocks, M]; per precision region, repeated per block, for
scale_span="region"), and, when the format asks for them (asymmetric weights), the per-token sums of the
integer codes over runs of `sum_group` channels (int32 [K // sum_group, M]), so the GEMM's zero-point term
needs no second pass over the codes.

The permutation is a gather folded into the loads: the kernel reads x[:, perm[0::2]] and
x[:, perm[1::2]] tile by tile, so the permuted copy of x is never written. One launch; each block is
read twice (a max pass for its per-token scale, then the quantize pass), the second read mostly from
L1/L2. A program owns `block_m` rows and walks all K channels, so it needs no cross-program reduction.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cometjax.core.formats import ActivationFormat, QuantizedActivation
from cometjax.core.numerics import pack_int4, round_half_up, short_max

INT8_MAX = 127
INT4_MAX = 7


@dataclasses.dataclass(frozen=True)
class QuantizeActTuning:
  """Tile sizes: `block_m` tokens x `block_pairs` channel pairs (2 * block_pairs channels)."""

  block_m: int = 16
  block_pairs: int = 64
  num_warps: int = 4
  num_stages: int = 1

  def resolve(self, num_tokens: int, fmt: ActivationFormat) -> QuantizeActTuning:
    """Shrinks the tiles to the problem: block_m <= next_pow2(M), block_pairs | (sum_group or block_size) // 2."""
    for name in ("block_m", "block_pairs"):
      value = getattr(self, name)
      if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    block_m = min(self.block_m, pl.next_power_of_2(num_tokens))
    block_pairs = self.block_pairs
    while ((fmt.sum_group or fmt.block_size) // 2) % block_pairs:
      block_pairs //= 2
    return dataclasses.replace(self, block_m=block_m, block_pairs=block_pairs)


def _quantize_act_kernel(
    x_ref,  # [block_m, K] float
    even_channels_ref,  # [K // 2] int32: perm[0::2]
    odd_channels_ref,  # [K // 2] int32: perm[1::2]
    *out_refs,  # [int8_part [2, block_m, K8 // 2]] [int4_part [block_m, K4 // 2]] scales [num_blocks, block_m]
                # [code_sums [K // sum_group, block_m]]
    fmt: ActivationFormat,
    block_pairs: int,
):
  block_m = x_ref.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (block_m, block_pairs), 0)
  out_refs = list(out_refs)
  int8_ref = out_refs.pop(0) if fmt.int8_channels else None
  int4_ref = out_refs.pop(0) if fmt.int4_channels else None
  scales_ref = out_refs.pop(0)
  sums_ref = out_refs.pop(0) if fmt.sum_group else None
  block_p = fmt.block_size // 2  # channel pairs per block
  sum_p = (fmt.sum_group or fmt.block_size) // 2  # channel pairs per code sum (one sum run per block without sums)

  def load_pair_tile(first_pair):  # -> (x_even, x_odd) f32 [block_m, block_pairs]
    even_cols = even_channels_ref[pl.ds(first_pair, block_pairs)]
    odd_cols = odd_channels_ref[pl.ds(first_pair, block_pairs)]
    x_even = x_ref[rows, jnp.broadcast_to(even_cols[None, :], rows.shape)]
    x_odd = x_ref[rows, jnp.broadcast_to(odd_cols[None, :], rows.shape)]
    return x_even.astype(jnp.float32), x_odd.astype(jnp.float32)

  def scale_of(first_pair, num_pairs, qmax):  # per-token scale over a run of pairs -> f32 [block_m]
    def max_body(t, amax):
      x_even, x_odd = load_pair_tile(first_pair + t * block_pairs)
      tile_max = jnp.maximum(jnp.max(jnp.abs(x_even), axis=1), jnp.max(jnp.abs(x_odd), axis=1))
      return jnp.maximum(amax, tile_max)

    amax = lax.fori_loop(0, num_pairs // block_pairs, max_body, jnp.zeros((block_m,), jnp.float32))
    return jnp.where(amax > 0, amax / qmax, 1.0)

  def quantize(x, scale, qmax):  # -> int32 codes in [-qmax, qmax]
    return jnp.clip(round_half_up(x / scale[:, None]), -qmax, qmax).astype(jnp.int32)

  def region(first_block, num_blocks, qmax, store_tile):
    """Scales, codes and code sums of the blocks [first_block, first_block + num_blocks)."""
    first_pair = first_block * block_p
    region_scale = scale_of(first_pair, num_blocks * block_p, qmax) if fmt.scale_span == "region" else None

    @pl.loop(0, num_blocks)
    def _(b):
      block_pair = first_pair + b * block_p
      scale = region_scale if region_scale is not None else scale_of(block_pair, block_p, qmax)
      scales_ref[first_block + b, :] = scale

      @pl.loop(0, block_p // sum_p)
      def _(r):
        run_pair = block_pair + r * sum_p

        def tile_body(t, total):
          pair = run_pair + t * block_pairs
          x_even, x_odd = load_pair_tile(pair)
          even, odd = quantize(x_even, scale, qmax), quantize(x_odd, scale, qmax)
          store_tile(pair - first_pair, even, odd)
          return total + jnp.sum(even, axis=1) + jnp.sum(odd, axis=1)

        total = lax.fori_loop(0, sum_p // block_pairs, tile_body, jnp.zeros((block_m,), jnp.int32))
        if sums_ref is not None:
          sums_ref[run_pair // sum_p, :] = total

  if fmt.int8_channels:
    def store_int8(pair, even, odd):
      cols = pl.ds(pair, block_pairs)
      int8_ref[0, :, cols] = even.astype(jnp.int8)
      int8_ref[1, :, cols] = odd.astype(jnp.int8)

    region(0, fmt.num_int8_blocks, INT8_MAX, store_int8)
  if fmt.int4_channels:
    def store_int4(pair, even, odd):
      int4_ref[:, pl.ds(pair, block_pairs)] = ((even & 0xF) | ((odd & 0xF) << 4)).astype(jnp.uint8)

    region(fmt.num_int8_blocks, fmt.num_int4_blocks, INT4_MAX, store_int4)


def _split_permutation(perm, k):  # -> (even_channels, odd_channels) int32 [K // 2]
  if perm is None:
    channels = jnp.arange(k, dtype=jnp.int32)
  else:
    channels = jnp.asarray(perm, jnp.int32)
  return channels[0::2], channels[1::2]


def _check_inputs(x, perm, fmt):
  if not isinstance(fmt, ActivationFormat):
    raise ValueError(f"fmt must be an ActivationFormat, got {type(fmt).__name__}")
  if x.ndim != 2:
    raise ValueError(f"x must be [M, K] (flatten leading axes first), got shape {x.shape}")
  if x.shape[1] != fmt.in_features:
    raise ValueError(f"x has K={x.shape[1]} channels but fmt covers block_size * num_blocks = "
                     f"{fmt.in_features}; K must be a multiple of block_size={fmt.block_size}")
  if perm is not None and tuple(perm.shape) != (x.shape[1],):
    raise ValueError(f"perm must have shape [{x.shape[1]}], got {list(perm.shape)}")


@functools.partial(
    jax.jit,
    static_argnames=["fmt", "block_m", "block_pairs", "num_warps", "num_stages", "interpret"],
)
def quantize_act(
    x,  # [M, K] bf16/f32
    perm,  # [K] int32 or None
    *,
    fmt: ActivationFormat,
    block_m: int = QuantizeActTuning.block_m,
    block_pairs: int = QuantizeActTuning.block_pairs,
    num_warps: int = QuantizeActTuning.num_warps,
    num_stages: int = QuantizeActTuning.num_stages,
    interpret: bool = False,
) -> QuantizedActivation:
  """Permutes and quantizes x into the FMPQ layout of `fmt` with one Pallas kernel."""
  _check_inputs(x, perm, fmt)
  m, k = x.shape
  tuning = QuantizeActTuning(block_m, block_pairs, num_warps, num_stages).resolve(m, fmt)
  bm = tuning.block_m
  padded_m = pl.cdiv(m, bm) * bm
  x_padded = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  even_channels, odd_channels = _split_permutation(perm, k)
  int8_pairs, int4_pairs = fmt.int8_channels // 2, fmt.int4_channels // 2

  out_shape, out_specs = [], []
  if int8_pairs:
    out_shape.append(jax.ShapeDtypeStruct((2, padded_m, int8_pairs), jnp.int8))
    out_specs.append(pl.BlockSpec((2, bm, int8_pairs), lambda i: (0, i, 0)))
  if int4_pairs:
    out_shape.append(jax.ShapeDtypeStruct((padded_m, int4_pairs), jnp.uint8))
    out_specs.append(pl.BlockSpec((bm, int4_pairs), lambda i: (i, 0)))
  out_shape.append(jax.ShapeDtypeStruct((fmt.num_blocks, padded_m), jnp.float32))
  out_specs.append(pl.BlockSpec((fmt.num_blocks, bm), lambda i: (0, i)))
  if fmt.sum_group:
    out_shape.append(jax.ShapeDtypeStruct((fmt.num_sum_groups, padded_m), jnp.int32))
    out_specs.append(pl.BlockSpec((fmt.num_sum_groups, bm), lambda i: (0, i)))

  kernel = functools.partial(_quantize_act_kernel, fmt=fmt, block_pairs=tuning.block_pairs)
  outputs = list(pl.pallas_call(
      kernel,
      grid=(padded_m // bm,),
      in_specs=[
          pl.BlockSpec((bm, k), lambda i: (i, 0)),
          pl.BlockSpec((k // 2,), lambda i: (0,)),
          pl.BlockSpec((k // 2,), lambda i: (0,)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
      name="quantize_act",
  )(x_padded, even_channels, odd_channels))

  int8_part = outputs.pop(0)[:, :m] if int8_pairs else jnp.zeros((2, m, 0), jnp.int8)
  int4_part = outputs.pop(0)[:m] if int4_pairs else jnp.zeros((m, 0), jnp.uint8)
  scales = outputs.pop(0)[:, :m]
  code_sums = outputs.pop(0)[:, :m] if fmt.sum_group else None
  return QuantizedActivation(int8_part=int8_part, int4_part=int4_part, scales=scales, code_sums=code_sums,
                             format=fmt)


def _block_codes(x, fmt: ActivationFormat, first_block: int, num_blocks: int, qmax: int):
  """x [M, num_blocks * block_size] -> (int32 codes, scales f32 [num_blocks, M]) with one scale per block,
  or per region (scale_span="region")."""
  m = x.shape[0]
  blocks = x.reshape(m, num_blocks, fmt.block_size)
  if fmt.scale_span == "region":
    amax = jnp.broadcast_to(jnp.max(jnp.abs(x), axis=1, keepdims=True) if num_blocks else
                            jnp.zeros((m, 1)), (m, num_blocks))
  else:
    amax = short_max(jnp.abs(blocks), axis=2)  # [M, nb]: fused into the ops below
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  codes = jnp.clip(round_half_up(blocks / scale[:, :, None]), -qmax, qmax).astype(jnp.int32)
  return codes.reshape(m, -1), scale.T


@functools.partial(jax.jit, static_argnames=["fmt"])
def quantize_act_reference(
    x,  # [M, K] bf16/f32
    perm,  # [K] int32 or None
    fmt: ActivationFormat,
) -> QuantizedActivation:
  """Plain-jnp twin of `quantize_act` (same codes, scales and code sums)."""
  _check_inputs(x, perm, fmt)
  m, _ = x.shape
  x_perm = (x if perm is None else jnp.take(x, perm, axis=1)).astype(jnp.float32)
  split = fmt.int8_channels
  int8_codes, int8_scales = _block_codes(x_perm[:, :split], fmt, 0, fmt.num_int8_blocks, INT8_MAX)
  int4_codes, int4_scales = _block_codes(x_perm[:, split:], fmt, fmt.num_int8_blocks, fmt.num_int4_blocks, INT4_MAX)
  int8_part = jnp.stack([int8_codes[:, 0::2], int8_codes[:, 1::2]]).astype(jnp.int8)  # [2, M, K8 // 2]
  int4_part = pack_int4(int4_codes.astype(jnp.int8), axis=-1) if split < x.shape[1] else (
      jnp.zeros((m, 0), jnp.uint8))
  code_sums = None
  if fmt.sum_group:
    codes = jnp.concatenate([int8_codes, int4_codes], axis=1)  # [M, K]
    code_sums = codes.reshape(m, fmt.num_sum_groups, fmt.sum_group).sum(axis=2).T.astype(jnp.int32)
  return QuantizedActivation(int8_part=int8_part, int4_part=int4_part,
                             scales=jnp.concatenate([int8_scales, int4_scales], axis=0), code_sums=code_sums,
                             format=fmt)


@functools.partial(jax.jit, static_argnames=["fmt"])
def dequantized_act_reference(
    x,  # [M, K] bf16/f32
    perm,  # [K] int32 or None
    fmt: ActivationFormat,
) -> jax.Array:  # f32 [M, K], permuted channel order
  """`quantize_act_reference(x, perm, fmt).dequantize()` without packing: each block's codes times its
  per-token scale (the same codes and scales; all blocks in one pass, the fewest ops for a decode step)."""
  if fmt.scale_span == "region":  # format version 2: one scale per precision region
    return quantize_act_reference(x, perm, fmt).dequantize()
  _check_inputs(x, perm, fmt)
  m = x.shape[0]
  x_perm = (x if perm is None else jnp.take(x, perm, axis=1)).astype(jnp.float32)
  blocks = x_perm.reshape(m, fmt.num_blocks, fmt.block_size)
  is_int8 = (jnp.arange(fmt.num_blocks) < fmt.num_int8_blocks)[:, None]  # [nb, 1]
  # each element's block max and scale computed where it is used: on a CPU XLA then fuses the whole function
  # into one loop (a [M, nb] scale array would be a kernel call of its own)
  amax = jnp.broadcast_to(short_max(jnp.abs(blocks), axis=2, keepdims=True), blocks.shape)  # [M, nb, bs]
  # the divisions exactly as `_block_codes` writes them (by each region's qmax), so the scales agree bitwise
  scale = jnp.where(amax > 0, jnp.where(is_int8, amax / INT8_MAX, amax / INT4_MAX), 1.0)
  qmax = jnp.where(is_int8, INT8_MAX, INT4_MAX)
  codes = jnp.clip(round_half_up(blocks / scale), -qmax, qmax).astype(jnp.int32)
  return (codes.astype(jnp.float32) * scale).reshape(m, -1)
