"""Shared pieces of the kernel tests: the two execution modes, GEMM inputs, lowering for CUDA.

Every kernel test body runs once interpreted (CPU) and once compiled (`MODES`): the compiled run needs a GPU
and is skipped elsewhere, with the reason; on a GPU both run, as in jax's own Pallas tests. Compiled kernels
have tiling minimums the interpreter lacks, so a body picks shapes and tiles per mode where it must.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cometjax.core.formats import QuantizedActivation, QuantizedWeight, pack_zero_points
from cometjax.core.numerics import pack_int4
from cometjax.ops import registry

ON_GPU = jax.default_backend() == "gpu"
MODES = [pytest.param("interpret", id="interpret"),
         pytest.param("compiled", id="compiled", marks=pytest.mark.skipif(
             not ON_GPU, reason="compiled Pallas kernels need a GPU; the interpreted run checks the same body"))]
SM90_MODES = [pytest.param("interpret", id="interpret"),
              pytest.param("compiled", id="compiled", marks=pytest.mark.skipif(
                  not registry.is_hopper(), reason="the sm90 kernel compiles for Hopper GPUs (compute capability 9.x)"))]


def interpreted(mode: str) -> bool:
  if mode not in ("interpret", "compiled"):
    raise ValueError(f"mode must be 'interpret' or 'compiled', got {mode!r}")
  return mode == "interpret"


def integer_gemm_case(m: int, k: int, n: int, fmt, seed: int, extremes: bool = False, zero_group: int | None = None,
                      packed_zeros: bool = False):
  """(qx, qw, exact int64 product) with unit scales and random codes over each precision's full range;
  `extremes` also plants a row of 127s, a row of -8s and a weight column of -8s (the x16 products must
  stay exact in int32). `zero_group` gives the weight integer-valued zero points per gcd(zero_group, block_size)
  input rows and the activation its code sums, so y = sum x (w - zero) stays an exact integer; `packed_zeros`
  stores them as packed 4-bit integer zero points (`pack_zero_points`) instead of f32."""
  rng = np.random.default_rng(seed)
  x_int8 = rng.integers(-127, 128, size=(m, fmt.int8_channels))
  x_int4 = rng.integers(-8, 8, size=(m, fmt.int4_channels))
  w_int = rng.integers(-8, 8, size=(k, n))
  if extremes:
    x_int8[0], x_int4[1], w_int[:, 0] = 127, -8, -8
  x_int = np.concatenate([x_int8, x_int4], axis=1)  # [M, K]
  group_size, zeros, code_sums = None, None, None
  if zero_group is not None:
    group_size = math.gcd(zero_group, fmt.block_size)
    zeros = rng.integers(-8 if packed_zeros else -3, 8 if packed_zeros else 4, size=(k // group_size, n))
    fmt = fmt.with_sums(group_size)
    code_sums = jnp.asarray(x_int.reshape(m, -1, group_size).sum(axis=2).T, jnp.int32)
  qx = QuantizedActivation(
      int8_part=jnp.asarray(np.stack([x_int8[:, 0::2], x_int8[:, 1::2]]), jnp.int8),
      int4_part=pack_int4(jnp.asarray(x_int4, jnp.int8)), scales=jnp.ones((fmt.num_blocks, m)),
      code_sums=code_sums, format=fmt)
  scale_rows = 1 if group_size is None else k // group_size
  qw = QuantizedWeight(data=pack_int4(jnp.asarray(w_int, jnp.int8), axis=0), scales=jnp.ones((scale_rows, n)),
                       perm=None, bits=4, group_size=group_size, shape=(k, n), activation=fmt,
                       zeros=None if zeros is None else pack_zero_points(zeros) if packed_zeros
                       else jnp.asarray(zeros, jnp.float32))
  qw.check_arrays()
  w_exact = w_int if zeros is None else w_int - np.repeat(zeros, group_size, axis=0)
  return qx, qw, x_int @ w_exact


def lowered_for_cuda(fn, *args) -> str:
  """The module text of jit(fn) exported for CUDA with no GPU present: Pallas lowers its kernels (Triton IR,
  Mosaic GPU MLIR) for an abstract H200, which jax >= 0.11 needs named (it dropped the assume-sm90 fallback)."""
  import jax
  from jax import export
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

  mesh = AbstractMesh((1,), ("gpu",), abstract_device=AbstractDevice("NVIDIA H200", 1, "cuda"))
  with use_abstract_mesh(mesh):
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  return exported.mlir_module()
