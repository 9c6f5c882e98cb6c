"""Formats and numerics (`cometjax.core`): INT4 packing, quantizers, QuantizedWeight / QuantizedKV pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cometjax import ops
from cometjax.core.formats import ActivationFormat, QuantizedWeight, dequantize_weight, quantize_weight
from cometjax.core.kv import dequantize_kv, quantize_kv
from cometjax.core.numerics import (SHORT_REDUCTION, dequantize_asymmetric, dequantize_symmetric, pack_int4,
                                    quantize_asymmetric, quantize_symmetric, short_max, short_min, unpack_int4)
from cometjax.errors import UnsupportedError

FUZZ = settings(max_examples=25, deadline=None)


@FUZZ
@given(rows_pairs=st.sampled_from([(1, 1), (3, 4)]), axis=st.sampled_from([0, -1]),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(rows_pairs, axis, seed):
  rows, pairs = rows_pairs  # few shapes: each new shape recompiles the eager ops
  rng = np.random.default_rng(seed)
  shape = [rows, 2 * pairs]
  if axis == 0:
    shape = [2 * pairs, rows]
  signed = rng.integers(-8, 8, size=shape).astype(np.int8)
  packed = pack_int4(signed, axis=axis)
  assert packed.dtype == jnp.uint8
  assert packed.shape[axis] == shape[axis] // 2
  np.testing.assert_array_equal(unpack_int4(packed, axis=axis), signed)
  codes = rng.integers(0, 16, size=shape).astype(np.uint8)
  np.testing.assert_array_equal(unpack_int4(pack_int4(codes, axis=axis), axis=axis, signed=False), codes)


def test_pack_layout_low_nibble_first():
  packed = pack_int4(np.array([[1, -2, 7, -8]], np.int8))
  np.testing.assert_array_equal(packed, [[0xE1, 0x87]])


def test_pack_odd_length_raises():
  with pytest.raises(ValueError, match="even length"):
    pack_int4(np.zeros((3, 5), np.int8), axis=-1)
  with pytest.raises(ValueError, match="uint8"):
    unpack_int4(np.zeros((3, 4), np.int8))


@FUZZ
@given(bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16), axis=st.sampled_from([0, 1, (0, 1)]),
       spread=st.floats(1e-3, 1e3))
def test_symmetric_error_bound(bits, seed, axis, spread):
  x = np.random.default_rng(seed).normal(size=(5, 12)).astype(np.float32) * spread
  q, scale = quantize_symmetric(x, bits, axis=axis)
  qmax = 2 ** (bits - 1) - 1
  assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q))) <= qmax
  error = np.abs(x - np.asarray(dequantize_symmetric(q, scale)))
  assert np.all(error <= np.asarray(scale) * (0.5 + 1e-5))


def test_symmetric_clipping_and_exact_zeros():
  x = np.array([[0.0, 0.0, 0.0], [-10.0, 1.0, 10.0]], np.float32)
  q, scale = quantize_symmetric(x, 4, axis=1, clip_ratio=0.5)
  np.testing.assert_array_equal(q[0], 0)
  assert float(scale[0, 0]) == 1.0
  np.testing.assert_array_equal(q[1], [-7, 1, 7])  # +-10 saturate at the clipped range +-5
  np.testing.assert_allclose(dequantize_symmetric(q, scale)[1], [-5.0, 5 / 7, 5.0], rtol=1e-6)
  with pytest.raises(ValueError, match="clip_ratio"):
    quantize_symmetric(x, 4, clip_ratio=0.0)
  with pytest.raises(ValueError, match="bits"):
    quantize_symmetric(x, 9)


@FUZZ
@given(bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16), offset=st.floats(-50, 50))
def test_asymmetric_error_bound(bits, seed, offset):
  x = np.random.default_rng(seed).normal(size=(4, 16)).astype(np.float32) + offset
  q, scale, zero = quantize_asymmetric(x, bits, axis=-1)
  assert q.dtype == jnp.uint8 and int(jnp.max(q)) <= 2**bits - 1
  error = np.abs(x - np.asarray(dequantize_asymmetric(q, scale, zero)))
  assert np.all(error <= np.asarray(scale) * (0.5 + 1e-4) + 1e-6 * abs(offset))


@FUZZ
@given(seed=st.integers(0, 2**16), offset=st.floats(-50, 50))
def test_asymmetric_float_zero_spans_min_to_max_and_integer_zero_shifts(seed, offset):
  x = np.random.default_rng(seed).normal(size=(4, 16)).astype(np.float32) + offset
  q, scale, zero = quantize_asymmetric(x, 4, axis=-1)
  x_dq = np.asarray(dequantize_asymmetric(q, scale, zero))
  tol = 1e-5 * (1 + abs(offset))
  # the float zero point puts codes 0 and 15 on each row's min and max exactly (KIVI's quantizer)
  np.testing.assert_allclose(x_dq.min(-1), x.min(-1), atol=tol)
  np.testing.assert_allclose(x_dq.max(-1), x.max(-1), atol=tol)
  qi, scale_i, zero_i = quantize_asymmetric(x, 4, axis=-1, integer_zero=True)
  assert np.array_equal(np.asarray(zero_i), np.round(np.asarray(zero_i)))
  error = np.abs(x - np.asarray(dequantize_asymmetric(qi, scale_i, zero_i)))
  assert np.all(error <= np.asarray(scale_i) * (1 + 1e-4) + tol)  # the shifted grid clips up to a step


@FUZZ
@given(length=st.integers(1, SHORT_REDUCTION + 3), axis=st.integers(0, 2), keepdims=st.booleans(),
       seed=st.integers(0, 2**16))
def test_short_reductions_equal_jnp_min_and_max(length, axis, keepdims, seed):
  # elementwise chains below SHORT_REDUCTION, a reduce above: the same values either way (min / max are exact)
  shape = [3, 2, 5]
  shape[axis] = length
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  x.flat[0] = np.nan if seed % 7 == 0 else x.flat[0]  # NaN propagates as through jnp.max
  np.testing.assert_array_equal(short_max(x, axis, keepdims), jnp.max(x, axis=axis, keepdims=keepdims))
  np.testing.assert_array_equal(short_min(x, axis, keepdims), jnp.min(x, axis=axis, keepdims=keepdims))


@FUZZ
@given(length=st.integers(2, 40), integer_zero=st.booleans(), seed=st.integers(0, 2**16))
def test_asymmetric_codes_match_the_returned_grid(length, integer_zero, seed):
  # the codes are computed from a grid recomputed at x's shape: it must be the grid returned
  x = np.random.default_rng(seed).normal(size=(3, length)).astype(np.float32) * 3
  q, scale, zero = quantize_asymmetric(x, 4, axis=-1, integer_zero=integer_zero)
  x = x.astype(np.float32)
  scale, zero = np.asarray(scale), np.asarray(zero)
  want = (np.floor(x / scale + 0.5) + zero) if integer_zero else np.floor(x / scale + zero + 0.5)
  np.testing.assert_array_equal(np.asarray(q), np.clip(want, 0, 15).astype(np.uint8))


def test_asymmetric_zero_slice_is_exact():
  q, scale, zero = quantize_asymmetric(np.zeros((2, 8), np.float32), 4, axis=-1)
  np.testing.assert_array_equal(dequantize_asymmetric(q, scale, zero), 0.0)


def test_activation_format_properties_and_errors():
  fmt = ActivationFormat(block_size=64, num_int8_blocks=1, num_blocks=4)
  assert (fmt.in_features, fmt.int8_channels, fmt.int4_channels) == (256, 64, 192)
  assert fmt.int4_block_fraction == 0.75
  assert ActivationFormat.for_features(512, 128, 0.25) == ActivationFormat(128, 1, 4)
  with pytest.raises(ValueError, match="num_int8_blocks"):
    ActivationFormat(64, 5, 4)
  with pytest.raises(ValueError, match="block_size"):
    ActivationFormat(63, 0, 4)
  with pytest.raises(ValueError, match="multiple of block_size"):
    ActivationFormat.for_features(100, 64)


@pytest.mark.parametrize("group_size", [None, 16])
def test_quantize_weight_layout_and_dequantize(group_size):
  k, n = 64, 24
  w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
  perm = np.random.default_rng(1).permutation(k).astype(np.int32)
  qw = quantize_weight(w, bits=4, group_size=group_size, perm=perm)
  assert qw.data.shape == (k // 2, n) and qw.data.dtype == jnp.uint8
  assert qw.scales.shape == ((1 if group_size is None else k // group_size), n)
  permuted = np.asarray(dequantize_weight(qw))
  np.testing.assert_allclose(permuted, np.asarray(dequantize_weight(qw, original_order=True))[perm])
  scales = np.repeat(np.asarray(qw.scales), k // qw.scales.shape[0], axis=0)
  assert np.all(np.abs(permuted - w[perm]) <= scales * (0.5 + 1e-5))
  # Row r of data is packed row pair (2i, 2i+1) of the permuted weight.
  values = np.asarray(unpack_int4(qw.data, axis=0))
  np.testing.assert_allclose(values * scales, permuted, rtol=1e-6)


def test_pack_int4_along_rows():
  values = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (10, 7)), jnp.int8)
  packed = pack_int4(values, axis=0)
  assert packed.shape == (5, 7) and packed.dtype == jnp.uint8
  assert (int(packed[0, 0]) & 0xF) == (int(values[0, 0]) & 0xF)  # row 0 in the low nibble
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed, axis=0)), np.asarray(values))
  with pytest.raises(ValueError, match="even"):
    pack_int4(values[:3], axis=0)


def test_quantize_weight_errors():
  w = np.zeros((64, 8), np.float32)
  with pytest.raises(ValueError, match="group_size"):
    quantize_weight(w, group_size=48)
  with pytest.raises(ValueError, match="bits"):
    quantize_weight(w, bits=3)
  with pytest.raises(ValueError, match="perm"):
    quantize_weight(w, perm=np.arange(32))
  with pytest.raises(ValueError, match="activation format covers"):
    quantize_weight(w, activation=ActivationFormat(16, 0, 2))
  qw = quantize_weight(w)
  bad = QuantizedWeight(data=qw.data, scales=jnp.ones((2, 8)), perm=None, bits=4, group_size=None,
                        shape=(64, 8))
  with pytest.raises(ValueError, match="scales must have shape"):
    ops.linear(jnp.zeros((1, 64)), bad, implementation="xla")
  with pytest.raises(ValueError, match="channels"):
    ops.linear(jnp.zeros((1, 32)), qw, implementation="xla")


@pytest.mark.parametrize("bits,int8_fraction", [(4, None), (4, 0.0), (4, 0.5), (8, 1.0), (8, None)])
def test_linear_quantized_paths_agree(bits, int8_fraction):
  k, n = 64, 32
  rng = np.random.default_rng(2)
  w = rng.normal(size=(k, n)).astype(np.float32)
  x = rng.normal(size=(2, 3, k)).astype(np.float32)
  fmt = None if int8_fraction is None else ActivationFormat.for_features(k, 32, int8_fraction)
  qw = quantize_weight(w, bits=bits, activation=fmt, perm=rng.permutation(k).astype(np.int32))
  y_xla = ops.linear(x, qw, implementation="xla")
  assert y_xla.shape == (2, 3, n) and y_xla.dtype == jnp.float32
  np.testing.assert_array_equal(ops.linear(x, qw, implementation="auto"), y_xla)  # CPU: auto is XLA
  if bits == 4 and fmt is not None:  # the Pallas kernels serve W4Ax
    np.testing.assert_allclose(ops.linear(x, qw, implementation="interpret"), y_xla, rtol=1e-5, atol=1e-5)
  else:  # no Pallas kernel serves A16 or 8-bit weights: an explicit request says so
    with pytest.raises(UnsupportedError, match="A16|4-bit weights"):
      ops.linear(x, qw, implementation="interpret")
  exact = x @ w
  tolerance = 0.25 if bits == 4 else 0.05  # 4-bit RTN on Gaussian data is coarse
  assert float(jnp.max(jnp.abs(y_xla - exact)) / jnp.max(jnp.abs(exact))) < tolerance


def test_w8a8_uses_int8_dot():
  k, n = 32, 16
  w = np.random.default_rng(3).normal(size=(k, n)).astype(np.float32)
  qw = quantize_weight(w, bits=8, activation=ActivationFormat(16, 2, 2))
  assert qw.data.dtype == jnp.int8 and qw.data.shape == (k, n)
  jaxpr = str(jax.make_jaxpr(lambda x: ops.linear(x, qw, implementation="xla"))(jnp.ones((2, k))))
  assert "preferred_element_type=int32" in jaxpr


def test_quantized_weight_is_a_pytree_through_jit_and_nnx():
  from flax import nnx

  k, n = 32, 16
  w = np.random.default_rng(4).normal(size=(k, n)).astype(np.float32)
  qw = quantize_weight(w, activation=ActivationFormat(16, 1, 2), perm=np.arange(k)[::-1].copy())
  leaves, treedef = jax.tree_util.tree_flatten(qw)
  assert len(leaves) == 3  # data, scales, perm; the rest is static
  x = jnp.ones((2, k))
  y = jax.jit(lambda qw, x: ops.linear(x, qw, implementation="xla"))(qw, x)
  # jit and eager may round a cancelling sum differently (outputs ~10, one entry ~1e-7)
  np.testing.assert_allclose(y, ops.linear(x, qw, implementation="xla"), rtol=1e-6, atol=1e-6)

  class Layer(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.asarray(w))

    def __call__(self, x):
      return ops.linear(x, self.kernel.get_value(), implementation="xla")

  layer = Layer()
  graphdef, state = nnx.split(layer)
  state["kernel"].set_value(qw)
  merged = nnx.merge(graphdef, state)
  np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(merged, x), y, rtol=1e-6)


def test_quantize_kv_round_trip_and_errors():
  rng = np.random.default_rng(5)
  k = rng.normal(size=(2, 8, 2, 32)).astype(np.float32)
  v = rng.normal(size=(2, 8, 2, 32)).astype(np.float32) * 3
  for group in (None, 16):
    kv = jax.jit(quantize_kv, static_argnums=2)(k, v, group)
    groups = 1 if group is None else 2
    assert kv.k.shape == (2, 8, 2, 16) and kv.k.dtype == jnp.uint8
    assert kv.k_scale.shape == (2, 8, 2, groups) and kv.group_size == (group or 32)
    k_dq, v_dq = jax.jit(dequantize_kv)(kv)
    k_bound = np.repeat(np.asarray(kv.k_scale), 32 // groups, axis=-1) * (0.5 + 1e-4)
    v_bound = np.repeat(np.asarray(kv.v_scale), 32 // groups, axis=-1) * (0.5 + 1e-4)
    assert np.all(np.abs(np.asarray(k_dq) - k) <= k_bound)
    assert np.all(np.abs(np.asarray(v_dq) - v) <= v_bound)
  with pytest.raises(ValueError, match="group"):
    quantize_kv(k, v, 12)
  with pytest.raises(ValueError, match="share one"):
    quantize_kv(k, v[:, :4])


@pytest.mark.parametrize("bits,fmt", [(4, ActivationFormat(16, 1, 4)), (8, ActivationFormat(16, 4, 4)), (4, None)])
def test_k_major_layout_holds_the_same_weight(bits, fmt):
  w = np.random.default_rng(8).normal(size=(64, 24)).astype(np.float32)
  qw = quantize_weight(w, bits, activation=fmt, perm=np.random.default_rng(9).permutation(64))
  nk = qw.with_layout("nk")
  assert nk.layout == "nk" and nk.data.shape == qw.data.shape[::-1] and nk.with_layout("kn").layout == "kn"
  nk.check_arrays()
  np.testing.assert_array_equal(nk.int_values(), qw.int_values())
  np.testing.assert_array_equal(dequantize_weight(nk, original_order=True), dequantize_weight(qw, original_order=True))
  x = np.random.default_rng(10).normal(size=(3, 64)).astype(np.float32)
  np.testing.assert_array_equal(ops.linear(x, nk, implementation="xla"), ops.linear(x, qw, implementation="xla"))
  if bits == 4 and fmt is not None:  # the Triton path reads [K // 2, N]: ops hands it that
    np.testing.assert_allclose(ops.linear(x, nk, implementation="interpret"), ops.linear(x, qw, implementation="xla"),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="layout must be one of"):
    qw.with_layout("mk")
  bad = QuantizedWeight(qw.data, qw.scales, qw.perm, bits=bits, group_size=None, shape=qw.shape, activation=fmt,
                        layout="nk")
  with pytest.raises(ValueError, match="layout='nk'"):
    bad.check_arrays()  # kn bytes labelled nk
