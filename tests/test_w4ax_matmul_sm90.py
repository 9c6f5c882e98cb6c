"""w4ax_matmul_sm90 (Mosaic GPU, Hopper) against w4ax_matmul_reference.

On CPU the kernel runs in the Mosaic GPU interpreter (TMA copies, barriers, the emit_pipeline, int8
wgmma into int32 accumulators, the persistent schedule; the warp-specialized pipeline for formats with
one pipeline per tile), with the weight in its [K // 2, N] layout because the interpreter takes no
transposed refs. The hardware variant (K-major weight, transposed B
views) cannot run here: `test_lowers_for_cuda_*` lower it to Mosaic GPU MLIR for CUDA instead, which
runs Pallas's Mosaic GPU lowering and its wgmma/layout/shared-memory checks, but not ptxas. The tests
marked gpu run the compiled kernel on a Hopper GPU.

Poisoning: the interpreter fills unwritten output memory with NaN (pinned down by
`test_interpreter_poisons_unwritten_outputs`), so a tile the schedule skips shows up as NaN.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from cometjax import ops
from cometjax.core.formats import ActivationFormat, QuantizedActivation, QuantizedWeight, quantize_weight
from cometjax.ops import registry
from cometjax.pallas import w4ax_matmul_sm90 as sm90
from cometjax.pallas.quantize_act import quantize_act_reference
from cometjax.pallas.w4ax_matmul import w4ax_matmul_reference

from kernel_cases import SM90_MODES, integer_gemm_case, interpreted, lowered_for_cuda

on_hopper = pytest.mark.skipif(not registry.is_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")


def _problem(m, k, n, block_size, num_int8_blocks, group_size=None, seed=0, dtype=np.float32, symmetric=True):
  rng = np.random.default_rng(seed)
  fmt = ActivationFormat(block_size, num_int8_blocks, k // block_size)
  perm = jnp.asarray(rng.permutation(k).astype(np.int32))
  w = rng.normal(size=(k, n)).astype(np.float32) + (0.0 if symmetric else 0.4)
  qw = quantize_weight(w, bits=4, group_size=group_size, activation=fmt, perm=perm, symmetric=symmetric)
  x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32) * np.linspace(0.2, 8, k, dtype=np.float32))
  return qw, quantize_act_reference(x.astype(dtype), perm, qw.activation)


def _assert_close(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape and not np.any(np.isnan(got)), "unwritten (NaN) output"
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(want))))


def test_interpreter_poisons_unwritten_outputs():
  def writes_one_row(o_ref):
    o_ref[0] = jnp.zeros((64,), jnp.float32)

  out = plgpu.kernel(writes_one_row, out_type=jax.ShapeDtypeStruct((2, 64), jnp.float32),
                     interpret=sm90._interpret_params())()
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.isnan(np.asarray(out[1])))


# ------------------------------------------------------------------------------------------------
# Interpreter against the reference (K=256, N=128; INT8 block fractions 0, 0.5, 1)


@pytest.mark.parametrize("m,block_size,num_int8_blocks,group_size,schedule,symmetric", [
    (64, 128, 0, None, "persistent", True),  # W4A4
    (128, 128, 1, None, "grid", True),  # half INT8, two M tiles
    (64, 64, 4, None, "persistent", True),  # W4A8
    (100, 64, 2, None, "persistent", True),  # M padded to 128
    (64, 128, 1, 64, "grid", True),  # group-wise weight scales: one pipeline per 64-channel segment
    (64, 128, 1, None, "persistent", False),  # zero point per output channel: code sums per block
    (100, 128, 1, 64, "grid", False),  # zero point per 64 rows
])
@pytest.mark.parametrize("mode", SM90_MODES)
def test_matches_reference(m, block_size, num_int8_blocks, group_size, schedule, symmetric, mode):
  qw, qx = _problem(m, 256, 128, block_size, num_int8_blocks, group_size, symmetric=symmetric)
  got = sm90.w4ax_matmul_sm90(qx, qw, block_n=64, schedule=schedule, num_programs=3, interpret=interpreted(mode))
  _assert_close(got, w4ax_matmul_reference(qx, qw))


@pytest.mark.parametrize("m,block_size,num_int8_blocks,symmetric", [
    (64, 256, 0, True),  # W4A4: one block over K, one pipeline per tile (the interpreter's limit, see the ValueError)
    (64, 256, 1, True),  # W4A8
    (64, 256, 0, False),  # W4A4 with a zero point per output channel
])
@pytest.mark.parametrize("mode", SM90_MODES)
def test_warp_specialized_matches_reference(m, block_size, num_int8_blocks, symmetric, mode):
  qw, qx = _problem(m, 256, 128, block_size, num_int8_blocks, symmetric=symmetric)
  got = sm90.w4ax_matmul_sm90(qx, qw, block_n=64, schedule="grid", warp_specialized=True,
                              interpret=interpreted(mode))
  _assert_close(got, w4ax_matmul_reference(qx, qw))


@pytest.mark.parametrize("mode", SM90_MODES)
@pytest.mark.parametrize("zero_group,packed_zeros", [(None, False), (64, False), (64, True)])
def test_integer_accumulation_is_exact(zero_group, packed_zeros, mode):
  m, k, n = 64, 256, 64
  fmt = ActivationFormat(64, 2, 4)
  qx, qw, exact = integer_gemm_case(m, k, n, fmt, seed=3, extremes=True, zero_group=zero_group,
                                    packed_zeros=packed_zeros)
  got = sm90.w4ax_matmul_sm90(qx, qw, block_k=64, interpret=interpreted(mode))
  np.testing.assert_array_equal(np.asarray(got).astype(np.int64), exact)
  np.testing.assert_array_equal(np.asarray(w4ax_matmul_reference(qx, qw)).astype(np.int64), exact)


@pytest.mark.parametrize("mode", SM90_MODES)
def test_bf16_output(mode):
  qw, qx = _problem(64, 128, 128, 64, 1, dtype=jnp.bfloat16)
  got = sm90.w4ax_matmul_sm90(qx, qw, out_dtype=jnp.bfloat16, interpret=interpreted(mode))
  want = w4ax_matmul_reference(qx, qw, out_dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# Errors, support predicate, tuning


def qw_other_format(qw):  # qw with an all-INT4 activation plan
  fmt = ActivationFormat(qw.activation.block_size, 0, qw.activation.num_blocks)
  return QuantizedWeight(qw.data, qw.scales, qw.perm, bits=4, group_size=qw.group_size, shape=qw.shape, activation=fmt)


def test_errors():
  qw, qx = _problem(8, 256, 128, 128, 1)
  with pytest.raises(ValueError, match="block_m must be 64 or 128"):
    sm90.w4ax_matmul_sm90(qx, qw, block_m=32, interpret=True)
  with pytest.raises(ValueError, match="block_k must be in"):
    sm90.w4ax_matmul_sm90(qx, qw, block_k=32, interpret=True)
  with pytest.raises(ValueError, match="block_n must be a power of two"):
    sm90.w4ax_matmul_sm90(qx, qw, block_n=96, interpret=True)
  with pytest.raises(ValueError, match="schedule must be one of"):
    sm90.w4ax_matmul_sm90(qx, qw, schedule="dynamic", interpret=True)
  qx_big, qw_big = _abstract(8, 2048, 256, 1024, 1)  # 8 pipeline steps per 1024-channel block
  with pytest.raises(ValueError, match="shared memory"):  # raised while tracing: nothing runs
    jax.eval_shape(lambda qx, qw: sm90.w4ax_matmul_sm90(qx, qw, block_m=128, block_n=256, max_concurrent_steps=8),
                   qx_big, qw_big)
  with pytest.raises(ValueError, match="out_dtype must be"):
    sm90.w4ax_matmul_sm90(qx, qw, out_dtype=jnp.int32, interpret=True)
  qw_n, qx_n = _problem(8, 256, 96, 128, 1)
  with pytest.raises(ValueError, match="multiple of 64"):
    sm90.w4ax_matmul_sm90(qx_n, qw_n, interpret=True)
  qw_small, qx_small = _problem(8, 128, 128, 32, 1)
  with pytest.raises(ValueError, match="block_size and group_size must be multiples of 64"):
    sm90.w4ax_matmul_sm90(qx_small, qw_small, interpret=True)
  w8 = quantize_weight(np.ones((256, 128), np.float32), bits=8, activation=qw.activation)
  with pytest.raises(ValueError, match="4-bit weight"):
    sm90.w4ax_matmul_sm90(qx, w8, interpret=True)
  _, qx_other = _problem(8, 256, 128, 128, 0)
  with pytest.raises(ValueError, match="activation format mismatch"):
    sm90.w4ax_matmul_sm90(qx_other, qw, interpret=True)
  with pytest.raises(ValueError, match="one pipeline per tile"):  # mixed INT8/INT4: two pipelines
    sm90.w4ax_matmul_sm90(qx, qw, warp_specialized=True, schedule="grid", interpret=True)
  with pytest.raises(ValueError, match="one pipeline per tile"):  # the persistent loop
    sm90.w4ax_matmul_sm90(qx_other, qw_other_format(qw), warp_specialized=True, interpret=True)


def test_support_predicates():
  spec = jax.ShapeDtypeStruct

  def weight(k, n, block_size, group_size=None, bits=4):
    rows = k // 2 if bits == 4 else k
    fmt = ActivationFormat(block_size, 1, k // block_size)
    return QuantizedWeight(spec((rows, n), jnp.uint8 if bits == 4 else jnp.int8),
                           spec((1 if group_size is None else k // group_size, n), jnp.float32), None, bits=bits,
                           group_size=group_size, shape=(k, n), activation=fmt)

  assert sm90.shape_supported(weight(4096, 4096, 128))
  assert sm90.shape_supported(weight(4096, 14336, 128, group_size=128))
  assert sm90.shape_supported(weight(512, 192, 64))  # block_n shrinks to 64
  assert not sm90.shape_supported(weight(512, 200, 64))  # N % 64
  assert not sm90.shape_supported(weight(512, 256, 32))  # 32-channel blocks
  assert not sm90.shape_supported(weight(512, 256, 128, group_size=32))
  assert not sm90.shape_supported(weight(512, 256, 128, bits=8))
  assert sm90.W4AxSm90Tuning().resolve(3, 4096, 128).block_m == 64
  assert sm90.W4AxSm90Tuning(block_m=128).resolve(300, 4096, 128).block_m == 128
  assert sm90.W4AxSm90Tuning(block_n=256, block_k=256).resolve(1, 192, 64) == sm90.W4AxSm90Tuning(
      block_n=64, block_k=64)


# ------------------------------------------------------------------------------------------------
# Hardware variant, lowered for CUDA without a GPU (Pallas -> Mosaic GPU MLIR; not ptxas)


def _mosaic_calls_when_lowered_for_cuda(fn, *args) -> int:
  return lowered_for_cuda(fn, *args).count("mosaic_gpu")


def _abstract(m, k, n, block_size, num_int8_blocks, group_size=None, symmetric=True):
  spec = jax.ShapeDtypeStruct
  sum_group = None if symmetric else (block_size if group_size is None else math.gcd(group_size, block_size))
  fmt = ActivationFormat(block_size, num_int8_blocks, k // block_size, sum_group=sum_group)
  scale_rows = 1 if group_size is None else k // group_size
  qw = QuantizedWeight(spec((k // 2, n), jnp.uint8), spec((scale_rows, n), jnp.float32), spec((k,), jnp.int32),
                       bits=4, group_size=group_size, shape=(k, n), activation=fmt,
                       zeros=None if symmetric else spec((scale_rows, n), jnp.float32))
  qx = QuantizedActivation(spec((2, m, fmt.int8_channels // 2), jnp.int8), spec((m, fmt.int4_channels // 2), jnp.uint8),
                           spec((fmt.num_blocks, m), jnp.float32),
                           None if symmetric else spec((fmt.num_sum_groups, m), jnp.int32), fmt)
  return qx, qw


@pytest.mark.parametrize("num_int8_blocks,group_size,schedule,out_dtype,tiles", [
    (1, None, "persistent", jnp.bfloat16, {}),
    (1, None, "persistent", jnp.bfloat16, dict(symmetric=False)),
    (2, 128, "grid", jnp.float32, dict(symmetric=False, warp_specialized=True)),
    (1, None, "persistent", jnp.bfloat16, dict(warp_specialized=True)),
    (2, 128, "grid", jnp.float32, dict(warp_specialized=True, block_m=128)),
    (0, None, "grid", jnp.float32, dict(block_k=64)),
    (4, None, "persistent", jnp.float16, dict(block_m=128, block_n=256, block_k=256, max_concurrent_steps=1)),
    (1, None, "persistent", jnp.float32, dict(block_m=128, block_n=128, block_k=128, max_concurrent_steps=4)),
    (2, 128, "grid", jnp.bfloat16, dict(block_n=64)),
])
def test_lowers_for_cuda(num_int8_blocks, group_size, schedule, out_dtype, tiles):
  tiles = dict(tiles)
  qx, qw = _abstract(200, 512, 256, 128, num_int8_blocks, group_size, symmetric=tiles.pop("symmetric", True))
  calls = _mosaic_calls_when_lowered_for_cuda(
      lambda qx, qw: sm90.w4ax_matmul_sm90(qx, qw, out_dtype=out_dtype, schedule=schedule, **tiles), qx, qw)
  assert calls >= 1


def test_linear_dispatches_to_sm90_where_the_validation_table_prefers_it(monkeypatch):
  """With the device's validation table preferring it (as a validated Hopper run would write), "pallas"
  lowers to the Mosaic GPU GEMM."""
  monkeypatch.setattr(registry, "preferred_kernel", lambda kernel, kind=None: "w4ax_matmul_sm90")
  _, qw = _abstract(3, 256, 128, 128, 1)
  spec = jax.ShapeDtypeStruct
  module = lowered_for_cuda(lambda x, qw: ops.linear(x, qw, implementation="pallas"), spec((3, 256), jnp.bfloat16), qw)
  assert "mosaic_gpu" in module  # the GEMM
  assert module.count("__gpu$xla.gpu.triton") == 1  # quantize_act only


# ------------------------------------------------------------------------------------------------
# Compiled on a Hopper GPU


@on_hopper
@pytest.mark.parametrize("warp_specialized", [False, True])
@pytest.mark.parametrize("m,k,n,block_size,num_int8_blocks,group_size,schedule", [
    (1, 4096, 4096, 128, 8, None, "persistent"),
    (16, 4096, 11008, 128, 0, None, "grid"),
    (300, 4096, 1024, 128, 32, None, "persistent"),
    (256, 2048, 1024, 64, 8, 128, "persistent"),
    (64, 1024, 512, 128, 2, 128, "grid"),
])
def test_compiled_matches_reference_on_gpu(m, k, n, block_size, num_int8_blocks, group_size, schedule,
                                           warp_specialized):
  qw, qx = _problem(m, k, n, block_size, num_int8_blocks, group_size, seed=m)
  got = sm90.w4ax_matmul_sm90(qx, qw, schedule=schedule, warp_specialized=warp_specialized)
  _assert_close(got, w4ax_matmul_reference(qx, qw))
  got_bf16 = sm90.w4ax_matmul_sm90(qx, qw, out_dtype=jnp.bfloat16, schedule=schedule,
                                   warp_specialized=warp_specialized)
  np.testing.assert_allclose(np.asarray(got_bf16, np.float32), np.asarray(got, np.float32), rtol=1e-2,
                             atol=1e-2 * float(np.max(np.abs(np.asarray(got)))))


@on_hopper
def test_compiled_integer_accumulation_is_exact_on_gpu():
  m, k, n = 64, 1024, 256
  fmt = ActivationFormat(128, 3, 8)
  qx, qw, exact = integer_gemm_case(m, k, n, fmt, seed=5)
  for schedule in sm90.SCHEDULES:
    for warp_specialized in (False, True):
      got = sm90.w4ax_matmul_sm90(qx, qw, schedule=schedule, warp_specialized=warp_specialized)
      np.testing.assert_array_equal(np.asarray(got).astype(np.int64), exact)


def test_a_k_major_weight_needs_no_transpose_on_hopper():
  """The hardware variant reads the weight [N, K // 2]: stored so ("nk"), it goes in untouched; a "kn" weight is
  transposed per call. The interpreter reads [K // 2, N] and takes either layout to the same numbers."""
  qx, qw = _abstract(64, 256, 128, 128, 1)
  nk = QuantizedWeight(jax.ShapeDtypeStruct((128, 128), jnp.uint8), qw.scales, qw.perm, bits=4, group_size=None,
                       shape=qw.shape, activation=qw.activation, layout="nk")
  module_nk = lowered_for_cuda(lambda qx, qw: sm90.w4ax_matmul_sm90(qx, qw), qx, nk)
  module_kn = lowered_for_cuda(lambda qx, qw: sm90.w4ax_matmul_sm90(qx, qw), qx, qw)
  assert "mosaic_gpu" in module_nk and module_nk.count("stablehlo.transpose") == 0
  assert module_kn.count("stablehlo.transpose") == 1
  real_qw, real_qx = _problem(64, 256, 128, 128, 1)
  got = sm90.w4ax_matmul_sm90(real_qx, real_qw.with_layout("nk"), interpret=True)
  _assert_close(got, w4ax_matmul_reference(real_qx, real_qw))
