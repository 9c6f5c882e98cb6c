"""Helpers shared by the kernel bodies: power-of-two checks and the INT4 -> INT8 register unpack."""

from __future__ import annotations

import jax.numpy as jnp


def is_power_of_two(n) -> bool:
  return isinstance(n, int) and n > 0 and not n & (n - 1)


def unpack_int4_x16(packed, lane_dtype=jnp.int32):
  """uint8 [r, c] -> (low nibble * 16, high nibble * 16) int8 [r, c] each, sign included.

  COMET's trick: each nibble is shifted into the high half of an int8 (value * 16), so no separate
  sign-extension step is needed; the 1/16 is folded into the float scale. The shifts run in `lane_dtype`
  (int32 for Triton; int16 for Mosaic GPU, which has no 8-bit shifts).
  """
  bits = jnp.iinfo(lane_dtype).bits
  wide = packed.astype(lane_dtype)  # zero-extended: 0..255
  low16 = (wide << (bits - 4)) >> (bits - 8)  # arithmetic shift: the signed nibble lands in bits 4..7
  high16 = ((wide >> 4) << (bits - 4)) >> (bits - 8)
  return low16.astype(jnp.int8), high16.astype(jnp.int8)
