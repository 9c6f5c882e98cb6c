"""Shared inputs for the GEMM kernel tests."""

import jax.numpy as jnp
import numpy as np

from cometjax.core.formats import QuantizedActivation, QuantizedWeight
from cometjax.core.numerics import pack_int4


def integer_gemm_case(m: int, k: int, n: int, fmt, seed: int, extremes: bool = False):
  """(qx, qw, exact int64 product) with unit scales and random codes over each precision's full range;
  `extremes` also plants a row of 127s, a row of -8s and a weight column of -8s (the x16 products must
  stay exact in int32)."""
  rng = np.random.default_rng(seed)
  x_int8 = rng.integers(-127, 128, size=(m, fmt.int8_channels))
  x_int4 = rng.integers(-8, 8, size=(m, fmt.int4_channels))
  w_int = rng.integers(-8, 8, size=(k, n))
  if extremes:
    x_int8[0], x_int4[1], w_int[:, 0] = 127, -8, -8
  qx = QuantizedActivation(
      int8_part=jnp.asarray(np.stack([x_int8[:, 0::2], x_int8[:, 1::2]]), jnp.int8),
      int4_part=pack_int4(jnp.asarray(x_int4, jnp.int8)),
      int8_scale=jnp.ones((m,)), int4_scale=jnp.ones((m,)), format=fmt)
  qw = QuantizedWeight(data=pack_int4(jnp.asarray(w_int, jnp.int8), axis=0), scales=jnp.ones((1, n)),
                       perm=None, bits=4, group_size=None, shape=(k, n), activation=fmt)
  return qx, qw, np.concatenate([x_int8, x_int4], axis=1) @ w_int
