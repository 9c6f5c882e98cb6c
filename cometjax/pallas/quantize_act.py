"""Fused channel permutation + per-token FMPQ quantization of activations (Pallas Triton backend).

x [M, K] (bf16/f32) -> `QuantizedActivation` (layout in `cometjax.core.formats`): the permuted INT8 region
as int8 [2, M, K8 // 2] (even / odd channels), the INT4 region as packed uint8 [M, K4 // 2], and one
symmetric per-token scale per precision group.

The permutation is a gather folded into the loads: the kernel reads x[:, perm[0::2]] and
x[:, perm[1::2]] tile by tile, so the permuted copy of x is never written. One launch; each region is
read twice (a max pass for the per-token scale, then the quantize pass), the second read mostly from
L2. A program owns `block_m` rows and walks all K channels, so it needs no cross-program reduction.
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
from cometjax.core.numerics import pack_int4, round_half_up

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
    """Shrinks the tiles to the problem: block_m <= next_pow2(M), block_pairs | block_size // 2."""
    for name in ("block_m", "block_pairs"):
      value = getattr(self, name)
      if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    block_m = min(self.block_m, pl.next_power_of_2(num_tokens))
    block_pairs = self.block_pairs
    while (fmt.block_size // 2) % block_pairs:
      block_pairs //= 2
    return dataclasses.replace(self, block_m=block_m, block_pairs=block_pairs)


def _quantize_act_kernel(
    x_ref,  # [block_m, K] float
    even_channels_ref,  # [K // 2] int32: perm[0::2]
    odd_channels_ref,  # [K // 2] int32: perm[1::2]
    *out_refs,  # when K8 > 0: int8_part [2, block_m, K8 // 2], int8_scale [block_m];
                # when K4 > 0: int4_part [block_m, K4 // 2], int4_scale [block_m]
    int8_pairs: int,
    int4_pairs: int,
    block_pairs: int,
):
  block_m = x_ref.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (block_m, block_pairs), 0)

  def load_pair_tile(first_pair):  # -> (x_even, x_odd) f32 [block_m, block_pairs]
    even_cols = even_channels_ref[pl.ds(first_pair, block_pairs)]
    odd_cols = odd_channels_ref[pl.ds(first_pair, block_pairs)]
    x_even = x_ref[rows, jnp.broadcast_to(even_cols[None, :], rows.shape)]
    x_odd = x_ref[rows, jnp.broadcast_to(odd_cols[None, :], rows.shape)]
    return x_even.astype(jnp.float32), x_odd.astype(jnp.float32)

  def region_scale(first_pair, num_pairs, qmax):  # -> f32 [block_m]
    def max_body(t, amax):
      x_even, x_odd = load_pair_tile(first_pair + t * block_pairs)
      tile_max = jnp.maximum(jnp.max(jnp.abs(x_even), axis=1), jnp.max(jnp.abs(x_odd), axis=1))
      return jnp.maximum(amax, tile_max)

    amax = lax.fori_loop(0, num_pairs // block_pairs, max_body, jnp.zeros((block_m,), jnp.float32))
    return jnp.where(amax > 0, amax / qmax, 1.0)

  def quantize(x, scale, qmax):  # -> int32 codes in [-qmax, qmax]
    return jnp.clip(round_half_up(x / scale[:, None]), -qmax, qmax).astype(jnp.int32)

  out_refs = list(out_refs)
  if int8_pairs:
    int8_ref, int8_scale_ref = out_refs.pop(0), out_refs.pop(0)
    scale = region_scale(0, int8_pairs, INT8_MAX)
    int8_scale_ref[...] = scale

    @pl.loop(0, int8_pairs // block_pairs)
    def _(t):
      x_even, x_odd = load_pair_tile(t * block_pairs)
      cols = pl.ds(t * block_pairs, block_pairs)
      int8_ref[0, :, cols] = quantize(x_even, scale, INT8_MAX).astype(jnp.int8)
      int8_ref[1, :, cols] = quantize(x_odd, scale, INT8_MAX).astype(jnp.int8)

  if int4_pairs:
    int4_ref, int4_scale_ref = out_refs.pop(0), out_refs.pop(0)
    scale = region_scale(int8_pairs, int4_pairs, INT4_MAX)
    int4_scale_ref[...] = scale

    @pl.loop(0, int4_pairs // block_pairs)
    def _(t):
      x_even, x_odd = load_pair_tile(int8_pairs + t * block_pairs)
      low = quantize(x_even, scale, INT4_MAX) & 0xF
      high = quantize(x_odd, scale, INT4_MAX) & 0xF
      int4_ref[:, pl.ds(t * block_pairs, block_pairs)] = (low | (high << 4)).astype(jnp.uint8)


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
  padded_m = pl.cdiv(m, tuning.block_m) * tuning.block_m
  x_padded = jnp.pad(x, ((0, padded_m - m), (0, 0)))
  even_channels, odd_channels = _split_permutation(perm, k)
  int8_pairs, int4_pairs = fmt.int8_channels // 2, fmt.int4_channels // 2

  out_shape, out_specs = [], []
  scale_spec = pl.BlockSpec((tuning.block_m,), lambda i: (i,))
  if int8_pairs:
    out_shape += [jax.ShapeDtypeStruct((2, padded_m, int8_pairs), jnp.int8),
                  jax.ShapeDtypeStruct((padded_m,), jnp.float32)]
    out_specs += [pl.BlockSpec((2, tuning.block_m, int8_pairs), lambda i: (0, i, 0)), scale_spec]
  if int4_pairs:
    out_shape += [jax.ShapeDtypeStruct((padded_m, int4_pairs), jnp.uint8),
                  jax.ShapeDtypeStruct((padded_m,), jnp.float32)]
    out_specs += [pl.BlockSpec((tuning.block_m, int4_pairs), lambda i: (i, 0)), scale_spec]

  kernel = functools.partial(_quantize_act_kernel, int8_pairs=int8_pairs, int4_pairs=int4_pairs,
                             block_pairs=tuning.block_pairs)
  outputs = pl.pallas_call(
      kernel,
      grid=(padded_m // tuning.block_m,),
      in_specs=[
          pl.BlockSpec((tuning.block_m, k), lambda i: (i, 0)),
          pl.BlockSpec((k // 2,), lambda i: (0,)),
          pl.BlockSpec((k // 2,), lambda i: (0,)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      interpret=interpret,
      name="quantize_act",
  )(x_padded, even_channels, odd_channels)

  outputs = list(outputs)
  if int8_pairs:
    int8_part, int8_scale = outputs.pop(0)[:, :m], outputs.pop(0)[:m]
  else:
    int8_part, int8_scale = jnp.zeros((2, m, 0), jnp.int8), jnp.ones((m,), jnp.float32)
  if int4_pairs:
    int4_part, int4_scale = outputs.pop(0)[:m], outputs.pop(0)[:m]
  else:
    int4_part, int4_scale = jnp.zeros((m, 0), jnp.uint8), jnp.ones((m,), jnp.float32)
  return QuantizedActivation(int8_part=int8_part, int4_part=int4_part, int8_scale=int8_scale,
                             int4_scale=int4_scale, format=fmt)


def _quantize_group(x, qmax):  # [M, C] -> (int32 codes [M, C], scale [M])
  amax = jnp.max(jnp.abs(x), axis=1) if x.shape[1] else jnp.zeros(x.shape[:1], jnp.float32)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  codes = jnp.clip(round_half_up(x / scale[:, None]), -qmax, qmax).astype(jnp.int32)
  return codes, scale


@functools.partial(jax.jit, static_argnames=["fmt"])
def quantize_act_reference(
    x,  # [M, K] bf16/f32
    perm,  # [K] int32 or None
    fmt: ActivationFormat,
) -> QuantizedActivation:
  """Plain-jnp twin of `quantize_act` (same codes and scales)."""
  _check_inputs(x, perm, fmt)
  m, _ = x.shape
  x_perm = (x if perm is None else jnp.take(x, perm, axis=1)).astype(jnp.float32)
  split = fmt.int8_channels
  int8_codes, int8_scale = _quantize_group(x_perm[:, :split], INT8_MAX)
  int4_codes, int4_scale = _quantize_group(x_perm[:, split:], INT4_MAX)
  int8_part = jnp.stack([int8_codes[:, 0::2], int8_codes[:, 1::2]]).astype(jnp.int8)  # [2, M, K8 // 2]
  int4_part = pack_int4(int4_codes.astype(jnp.int8), axis=-1) if split < x.shape[1] else (
      jnp.zeros((m, 0), jnp.uint8))
  return QuantizedActivation(int8_part=int8_part, int4_part=int4_part, int8_scale=int8_scale,
                             int4_scale=int4_scale, format=fmt)
