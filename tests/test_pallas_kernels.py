"""Pallas kernels (interpret mode on CPU, tiny shapes) against their jnp references.

Poisoning: in interpret mode Pallas fills every output buffer with NaN (floats) or the dtype's minimum
(ints) before the kernel runs (`test_interpret_mode_poisons_outputs` pins this down), so an unwritten
tile shows up as NaN / -128 / a mismatch. The int8 codes never reach -128 (they clip to +-127).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import pallas as pl

from cometjax import ops
from cometjax.core.formats import ActivationFormat, QuantizedActivation, QuantizedWeight, quantize_weight
from cometjax.core.kv import QuantizedKV, quantize_kv
from cometjax.errors import UnsupportedError
from cometjax.pallas.kv4_attention import kv4_attention, kv4_attention_reference, kv4_decode_attention
from cometjax.pallas.quantize_act import quantize_act, quantize_act_reference
from cometjax.pallas.w4ax_matmul import w4ax_matmul, w4ax_matmul_reference
from cometjax.pallas import w4ax_matmul as w4ax_matmul_module

from kernel_cases import MODES, integer_gemm_case, interpreted, lowered_for_cuda

FUZZ = settings(max_examples=5, deadline=None)


def _normal(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _assert_same_activation(got: QuantizedActivation, want: QuantizedActivation):
  for name in ("int8_part", "int4_part", "scales", "code_sums"):
    if getattr(want, name) is None:
      assert getattr(got, name) is None, name
      continue
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  assert not np.any(np.asarray(got.int8_part) == -128), "unwritten int8 tile"


def test_interpret_mode_poisons_outputs():
  def writes_nothing(x_ref, o_ref, i_ref):
    del x_ref, o_ref, i_ref

  out, out_int = pl.pallas_call(
      writes_nothing, out_shape=[jax.ShapeDtypeStruct((8,), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int8)],
      interpret=True)(jnp.zeros((8,)))
  assert np.all(np.isnan(out)) and np.all(np.asarray(out_int) == -128)


# ------------------------------------------------------------------------------------------------
# quantize_act


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_int8_blocks,dtype,scale_span,sum_group", [
    (0, np.float32, "block", None), (1, np.float32, "block", None), (3, np.float32, "block", None),
    (1, jnp.bfloat16, "block", None), (1, np.float32, "block", 16), (2, np.float32, "region", None),
    (1, np.float32, "region", 32)])
def test_quantize_act_matches_reference(num_int8_blocks, dtype, scale_span, sum_group, mode):
  fmt = ActivationFormat(block_size=32, num_int8_blocks=num_int8_blocks, num_blocks=3, scale_span=scale_span,
                         sum_group=sum_group)
  x = jnp.asarray(_normal(0, (5, 96)) * np.linspace(0.1, 20, 96, dtype=np.float32)).astype(dtype)
  perm = jnp.asarray(np.random.default_rng(1).permutation(96).astype(np.int32))
  tiles = dict(block_m=4, block_pairs=8) if interpreted(mode) else {}
  got = quantize_act(x, perm, fmt=fmt, interpret=interpreted(mode), **tiles)
  want = quantize_act_reference(x, perm, fmt)
  _assert_same_activation(got, want)
  x_perm = np.asarray(x, np.float32)[:, np.asarray(perm)]
  # every channel within half a step of its block's (or region's) per-token scale
  assert np.all(np.abs(np.asarray(got.dequantize()) - x_perm) <= np.asarray(got.channel_scales()) * (0.5 + 1e-5))
  blocks = np.abs(x_perm).reshape(5, 3, 32).max(axis=2)  # [M, blocks]
  if scale_span == "region":
    blocks[:, :num_int8_blocks] = blocks[:, :num_int8_blocks].max(axis=1, keepdims=True)
    blocks[:, num_int8_blocks:] = blocks[:, num_int8_blocks:].max(axis=1, keepdims=True)
  qmax = np.where(np.arange(3) < num_int8_blocks, 127.0, 7.0)
  np.testing.assert_allclose(np.asarray(got.scales).T, blocks / qmax, rtol=1e-6)
  if sum_group is not None:
    codes = np.concatenate([np.asarray(v, np.int64) for v in got.int_values()], axis=1)
    np.testing.assert_array_equal(np.asarray(got.code_sums).T, codes.reshape(5, -1, sum_group).sum(axis=2))


@pytest.mark.parametrize("mode", MODES)
def test_quantize_act_identity_permutation_and_zero_rows(mode):
  fmt = ActivationFormat(16, 1, 2)
  x = np.zeros((3, 32), np.float32)
  x[1] = _normal(2, (32,))
  got = quantize_act(jnp.asarray(x), None, fmt=fmt, interpret=interpreted(mode))
  _assert_same_activation(got, quantize_act_reference(jnp.asarray(x), None, fmt))
  assert np.all(np.asarray(got.scales[:, 0]) == 1.0) and np.all(np.asarray(got.int4_part[0]) == 0)


def test_quantize_act_errors():
  fmt = ActivationFormat(32, 1, 3)
  with pytest.raises(ValueError, match="multiple of block_size"):
    quantize_act(jnp.zeros((2, 80)), None, fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="perm must have shape"):
    quantize_act(jnp.zeros((2, 96)), jnp.arange(64, dtype=jnp.int32), fmt=fmt, interpret=True)
  with pytest.raises(ValueError, match="block_m must be a positive power of two"):
    quantize_act(jnp.zeros((2, 96)), None, fmt=fmt, block_m=3, interpret=True)


# ------------------------------------------------------------------------------------------------
# w4ax_matmul


def _problem(m, k, n, block_size, num_int8_blocks, group_size, seed=0, dtype=np.float32, symmetric=True):
  fmt = ActivationFormat(block_size, num_int8_blocks, k // block_size)
  perm = jnp.asarray(np.random.default_rng(seed + 1).permutation(k).astype(np.int32))
  w = _normal(seed + 2, (k, n)) + (0.0 if symmetric else 0.4)  # an offset the zero points absorb
  qw = quantize_weight(w, bits=4, group_size=group_size, activation=fmt, perm=perm, symmetric=symmetric)
  x = jnp.asarray(_normal(seed + 3, (m, k))).astype(dtype)
  return x, qw, quantize_act_reference(x, perm, qw.activation)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_int8_blocks,group_size,symmetric", [  # 0: W4A4, 4: W4A8
    (0, None, True), (1, None, True), (4, None, True), (1, 32, True), (0, 64, True), (4, 64, True),
    (1, None, False), (1, 16, False), (0, 64, False), (4, 32, False)])
def test_w4ax_matmul_matches_reference(num_int8_blocks, group_size, symmetric, mode):
  # compiled: scale segments of >= 64 channels (the interpreter takes 32-channel blocks and tiny tiles)
  block = 32 if interpreted(mode) else 64
  group = group_size if interpreted(mode) or group_size is None else max(64, 2 * group_size)
  _, qw, qx = _problem(m=5, k=4 * block, n=64, block_size=block, num_int8_blocks=num_int8_blocks, group_size=group,
                       symmetric=symmetric)
  assert qw.asymmetric == (not symmetric) and (qx.code_sums is None) == symmetric
  tiles = dict(block_m=4, block_n=32, block_k=16) if interpreted(mode) else {}
  got = w4ax_matmul(qx, qw, interpret=interpreted(mode), **tiles)
  want = w4ax_matmul_reference(qx, qw)
  assert got.shape == (5, 64) and not np.any(np.isnan(got))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zero_group,packed_zeros", [(None, False), (32, False), (32, True)])
def test_w4ax_matmul_integer_accumulation_is_exact(zero_group, packed_zeros, mode):
  m, k, n = (3, 64, 32) if interpreted(mode) else (3, 256, 64)
  fmt = ActivationFormat(k // 4, 2, 4)
  qx, qw, exact = integer_gemm_case(m, k, n, fmt, seed=7, zero_group=zero_group if interpreted(mode) else
                                    None if zero_group is None else 64, packed_zeros=packed_zeros)
  assert qw.integer_zeros == packed_zeros
  tiles = dict(block_m=2, block_n=16, block_k=16) if interpreted(mode) else {}
  got = w4ax_matmul(qx, qw, interpret=interpreted(mode), **tiles)
  np.testing.assert_array_equal(np.asarray(got).astype(np.int64), exact)
  np.testing.assert_array_equal(np.asarray(w4ax_matmul_reference(qx, qw)).astype(np.int64), exact)
  assert w4ax_matmul_module.float_sums_are_exact(qw)
  np.testing.assert_array_equal(np.asarray(w4ax_matmul_reference(qx, qw, float_sums=True)).astype(np.int64), exact)


@pytest.mark.parametrize("symmetric,group_size", [(True, None), (True, 32), (False, 32), (False, None)])
def test_w4ax_float_sums_equal_the_int32_reference_bit_for_bit(symmetric, group_size):
  # the CPU path of ops.linear (float32 segment dots) must not move a single bit against the int32 sums
  _, qw, qx = _problem(m=7, k=256, n=48, block_size=64, num_int8_blocks=1, group_size=group_size,
                       symmetric=symmetric, seed=11)
  np.testing.assert_array_equal(np.asarray(w4ax_matmul_reference(qx, qw, float_sums=True)),
                                np.asarray(w4ax_matmul_reference(qx, qw)))


@pytest.mark.parametrize("mode", MODES)
def test_w4ax_matmul_bf16_output_and_linear_dispatch(mode):
  block = 16 if interpreted(mode) else 64
  x, qw, qx = _problem(m=6, k=4 * block, n=32, block_size=block, num_int8_blocks=1, group_size=None,
                       dtype=jnp.bfloat16)
  got = w4ax_matmul(qx, qw, out_dtype=jnp.bfloat16, interpret=interpreted(mode))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(w4ax_matmul_reference(qx, qw, out_dtype=jnp.bfloat16), np.float32),
                             rtol=1e-2, atol=1e-2)
  x3 = x.reshape(2, 3, 4 * block)
  y_xla = ops.linear(x3, qw, implementation="xla")
  y_kernel = ops.linear(x3, qw, implementation="interpret" if interpreted(mode) else "pallas")
  assert y_kernel.shape == (2, 3, 32) and y_kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y_kernel, np.float32), np.asarray(y_xla, np.float32))


@pytest.mark.slow
@FUZZ
@given(m=st.integers(1, 9), block_size=st.sampled_from([16, 32]), num_blocks=st.integers(1, 3),
       int8_share=st.floats(0, 1), n=st.sampled_from([16, 48]), grouped=st.booleans(), symmetric=st.booleans(),
       seed=st.integers(0, 1000))
def test_w4ax_matmul_fuzz(m, block_size, num_blocks, int8_share, n, grouped, symmetric, seed):
  k = block_size * num_blocks
  x, qw, qx = _problem(m, k, n, block_size, round(int8_share * num_blocks),
                       block_size if grouped else None, seed=seed, symmetric=symmetric)
  got = w4ax_matmul(qx, qw, block_m=4, block_n=16, block_k=16, interpret=True)
  np.testing.assert_allclose(got, w4ax_matmul_reference(qx, qw), rtol=1e-6, atol=1e-5)
  fused = quantize_act(x, qw.perm, fmt=qw.activation, block_m=4, block_pairs=8, interpret=True)
  _assert_same_activation(fused, qx)


def test_w4ax_matmul_errors():
  _, qw, qx = _problem(m=2, k=64, n=32, block_size=32, num_int8_blocks=1, group_size=None)
  bad_scales = QuantizedWeight(data=qw.data, scales=jnp.ones((2, 32)), perm=qw.perm, bits=4,
                               group_size=None, shape=qw.shape, activation=qw.activation)
  with pytest.raises(ValueError, match="scales must have shape"):
    w4ax_matmul(qx, bad_scales, interpret=True)
  other_format = ActivationFormat(32, 0, 2)
  _, qw_other, _ = _problem(m=2, k=64, n=32, block_size=32, num_int8_blocks=0, group_size=None)
  assert qw_other.activation == other_format
  with pytest.raises(ValueError, match="activation format mismatch"):
    w4ax_matmul(qx, qw_other, interpret=True)
  bad_act = QuantizedActivation(qx.int8_part, qx.int4_part, jnp.ones((1, 2)), None, qx.format)
  with pytest.raises(ValueError, match=r"qx.scales must have shape \[2, 2\]"):
    w4ax_matmul(bad_act, qw, interpret=True)
  _, qw_asym, qx_asym = _problem(m=2, k=64, n=32, block_size=32, num_int8_blocks=1, group_size=16, symmetric=False)
  no_sums = QuantizedActivation(qx_asym.int8_part, qx_asym.int4_part, qx_asym.scales, None, qx_asym.format)
  with pytest.raises(ValueError, match="qx.code_sums is None"):
    w4ax_matmul(no_sums, qw_asym, interpret=True)
  import dataclasses
  wrong_sums = dataclasses.replace(qw_asym, activation=qw_asym.activation.with_sums(None))
  with pytest.raises(ValueError, match="activation.sum_group must be 16"):
    w4ax_matmul(qx, wrong_sums, interpret=True)
  w8 = quantize_weight(np.ones((64, 32), np.float32), bits=8, activation=qw.activation)
  with pytest.raises(ValueError, match="4-bit weight"):
    w4ax_matmul(qx, w8, interpret=True)
  with pytest.raises(ValueError, match="block_k must be a power of two"):
    w4ax_matmul(qx, qw, block_k=24, interpret=True)


# ------------------------------------------------------------------------------------------------
# kv4 attention


def _cache(batch, seq, kv_heads, head_dim, group, seed=0):
  k = _normal(seed, (batch, seq, kv_heads, head_dim))
  v = _normal(seed + 1, (batch, seq, kv_heads, head_dim))
  return quantize_kv(jnp.asarray(k), jnp.asarray(v), group)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group,dtype,tolerance", [(None, np.float32, 2e-5), (16, np.float32, 2e-5),
                                                   (None, jnp.bfloat16, 3e-2)])
def test_kv4_decode_matches_reference(group, dtype, tolerance, mode):
  if not interpreted(mode) and group is not None:
    pytest.skip("the compiled kernel needs head_dim groups of >= 32 channels")
  kv = _cache(batch=3, seq=64, kv_heads=2, head_dim=32, group=group)
  q = jnp.asarray(_normal(9, (3, 6, 32))).astype(dtype)
  lengths = jnp.array([1, 37, 64], jnp.int32)
  got = kv4_decode_attention(q, kv, lengths, block_k=16, k_splits=2, interpret=interpreted(mode))
  want = kv4_attention_reference(q[:, None], kv, lengths)[:, 0]
  assert got.shape == (3, 6, 32) and got.dtype == q.dtype and not np.any(np.isnan(np.asarray(got, np.float32)))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("mode", MODES)
def test_kv4_decode_empty_row_gives_zeros(mode):
  kv = _cache(batch=2, seq=32, kv_heads=1, head_dim=32, group=None)
  q = jnp.asarray(_normal(3, (2, 2, 32)))
  got = kv4_decode_attention(q, kv, jnp.array([0, 32], jnp.int32), block_k=16, k_splits=2,
                             interpret=interpreted(mode))
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(kv4_attention_reference(q[:, None], kv, jnp.array([0, 32]))[0], 0.0)


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(batch=st.integers(1, 3), seq_tiles=st.integers(1, 4), kv_heads=st.sampled_from([1, 2]),
       group_heads=st.sampled_from([1, 4]), num_queries=st.sampled_from([1, 3]), k_splits=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 1000))
def test_kv4_attention_fuzz(batch, seq_tiles, kv_heads, group_heads, num_queries, k_splits, seed):
  seq = 16 * seq_tiles
  kv = _cache(batch, seq, kv_heads, 32, None, seed)
  q = jnp.asarray(_normal(seed + 5, (batch, num_queries, kv_heads * group_heads, 32)))
  lengths = jnp.asarray(np.random.default_rng(seed).integers(1, seq + 1, size=batch), jnp.int32)
  got = kv4_attention(q, kv, lengths, block_h=4, block_k=16, k_splits=k_splits, interpret=True)
  np.testing.assert_allclose(got, kv4_attention_reference(q, kv, lengths), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_attention_kv4_dispatch_decode_and_prefill(mode):
  kernel = "interpret" if interpreted(mode) else "pallas"
  kv = _cache(batch=2, seq=32, kv_heads=2, head_dim=32, group=None)
  lengths = jnp.array([5, 32], jnp.int32)
  q1 = jnp.asarray(_normal(4, (2, 1, 4, 32)))
  np.testing.assert_allclose(ops.attention_kv4(q1, kv, lengths, implementation=kernel),
                             ops.attention_kv4(q1, kv, lengths, implementation="xla"), rtol=2e-5, atol=2e-5)
  # Prefill (causal, several row blocks and k splits); its last query equals a decode step.
  q5 = jnp.asarray(_normal(6, (2, 5, 4, 32)))
  tiles = dict(block_h=4, block_k=16, k_splits=2) if interpreted(mode) else dict(block_k=16, k_splits=2)
  prefill = kv4_attention(q5, kv, lengths, interpret=interpreted(mode), **tiles)
  assert not np.any(np.isnan(prefill))
  want = ops.attention_kv4(q5, kv, lengths, implementation="xla")
  np.testing.assert_allclose(prefill, want, rtol=2e-5, atol=2e-5)
  decode = ops.attention_kv4(q5[:, -1:], kv, lengths, implementation=kernel)
  np.testing.assert_allclose(prefill[:, -1:], decode, rtol=2e-5, atol=2e-5)


def test_kv4_attention_errors():
  kv = _cache(batch=2, seq=24, kv_heads=2, head_dim=32, group=None)
  lengths = jnp.array([3, 4], jnp.int32)
  with pytest.raises(ValueError, match="multiple of 16"):
    kv4_decode_attention(jnp.zeros((2, 4, 32)), kv, lengths, interpret=True)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    kv4_decode_attention(jnp.zeros((2, 3, 32)), kv, lengths, interpret=True)
  with pytest.raises(ValueError, match="D=32"):
    kv4_decode_attention(jnp.zeros((2, 4, 16)), kv, lengths, interpret=True)
  with pytest.raises(ValueError, match=r"q must be \[B, T, Hq, D\]"):
    kv4_attention(jnp.zeros((2, 4, 32)), kv, lengths, interpret=True)
  with pytest.raises(ValueError, match="lengths must be"):
    kv4_decode_attention(jnp.zeros((2, 4, 32)), kv, jnp.array([3]), interpret=True)
  bad = kv.__class__(kv.k, kv.v, kv.k_scale[:, :3], kv.k_zero, kv.v_scale, kv.v_zero)
  with pytest.raises(ValueError, match="k_scale must have shape"):
    kv4_attention_reference(jnp.zeros((2, 1, 4, 32)), bad, lengths)


# ------------------------------------------------------------------------------------------------
# Triton lowering (no GPU needed): exporting for CUDA runs the Pallas -> Triton IR lowering, which
# rejects primitives the Triton backend lacks and non-power-of-two tiles.


def _triton_calls_when_lowered_for_cuda(fn, *args) -> int:
  return lowered_for_cuda(fn, *args).count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("group_size,asymmetric", [(None, False), (128, False), (64, True)])
def test_w4ax_linear_lowers_to_triton(group_size, asymmetric):
  k, n = 256, 384
  spec = jax.ShapeDtypeStruct
  scale_rows = 1 if group_size is None else k // group_size
  fmt = ActivationFormat(128, 1, 2, sum_group=64 if asymmetric else None)
  qw = QuantizedWeight(spec((k // 2, n), jnp.uint8), spec((scale_rows, n), jnp.float32), spec((k,), jnp.int32),
                       bits=4, group_size=group_size, shape=(k, n), activation=fmt,
                       zeros=spec((scale_rows, n), jnp.float32) if asymmetric else None)
  calls = _triton_calls_when_lowered_for_cuda(lambda x, qw: ops.linear(x, qw, implementation="pallas"),
                                              spec((3, k), jnp.bfloat16), qw)
  assert calls == 2  # quantize_act + w4ax_matmul


def test_explicit_pallas_refuses_what_the_compiled_gemm_cannot_tile():
  k, n = 64, 32
  rng = np.random.default_rng(0)
  qw = quantize_weight(rng.normal(size=(k, n)).astype(np.float32), 4, activation=ActivationFormat(32, 1, 2))
  x = jnp.asarray(rng.normal(size=(3, k)), jnp.float32)
  with pytest.raises(UnsupportedError, match="linear: implementation='pallas' cannot serve this QuantizedWeight"
                                             ".*cannot tile it"):
    ops.linear(x, qw, implementation="pallas")  # 32-channel blocks: the compiled GEMM needs multiples of 64
  np.testing.assert_array_equal(ops.linear(x, qw, implementation="auto"), ops.linear(x, qw, implementation="xla"))


def test_kv4_attention_lowers_to_triton():
  spec = jax.ShapeDtypeStruct
  codes, stats = spec((2, 256, 2, 64), jnp.uint8), spec((2, 256, 2, 1), jnp.float32)
  kv = QuantizedKV(codes, codes, stats, stats, stats, stats)
  for q_shape in ((2, 1, 8, 128), (2, 64, 8, 128)):  # decode, prefill
    calls = _triton_calls_when_lowered_for_cuda(lambda q, kv, lengths: kv4_attention(q, kv, lengths),
                                                spec(q_shape, jnp.bfloat16), kv, spec((2,), jnp.int32))
    assert calls == 1
