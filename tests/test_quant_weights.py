"""The weight algorithms `quantize` calls (`cometjax.quant.clipping`, `cometjax.quant.gptq`): arrays in, arrays out."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cometjax.core.formats import ActivationFormat, QuantizedWeight, pack_zero_points
from cometjax.core.numerics import pack_int4
from cometjax.quant import clipping, gptq


def test_nan_in_calibration_samples_raises():
  w = np.ones((8, 4), np.float32)
  x = np.ones((5, 8), np.float32)
  x[1, 1] = np.nan
  with pytest.raises(ValueError, match="calibration activations x holds NaN"):
    clipping.learn_clip_ratios(w, x, 4, None, steps=2)
  with pytest.raises(ValueError, match="hessian holds NaN"):
    gptq.gptq_codes(w, np.full((8, 8), np.nan), np.ones((1, 4)), 4)


def _layer_error(x, w, codes, scales):
  wq = np.asarray(codes, np.float64) * np.repeat(np.asarray(scales), w.shape[0] // scales.shape[0], axis=0)
  return float(np.sum((x @ w - x @ wq) ** 2))


def test_gptq_beats_rtn_on_correlated_inputs():
  rng = np.random.default_rng(0)
  k, n = 64, 32
  mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
  x = rng.standard_normal((2048, k)) @ mix  # correlated channels
  w = rng.standard_normal((k, n))
  scales = np.asarray(clipping.scales_from_ratios(jnp.asarray(w, jnp.float32), jnp.ones((1, n)), 4, None))
  rtn = np.asarray(clipping.quantize_codes(jnp.asarray(w, jnp.float32), scales, 4))
  codes = gptq.gptq_codes(w, x.T @ x, scales, 4)
  assert np.abs(codes).max() <= 7
  assert _layer_error(x, w, codes, scales) < 0.7 * _layer_error(x, w, rtn, scales)


def test_gptq_shape_errors():
  with pytest.raises(ValueError, match="hessian must be"):
    gptq.gptq_codes(np.ones((8, 4)), np.eye(6), np.ones((1, 4)), 4)
  with pytest.raises(ValueError, match="scales must be"):
    gptq.gptq_codes(np.ones((8, 4)), np.eye(8), np.ones((3, 4)), 4)


def test_learned_clipping_does_not_lose_to_its_init():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((32, 16)).astype(np.float32)
  w[0] *= 6  # a heavy row makes max-scaling wasteful
  x = rng.standard_normal((512, 32)).astype(np.float32)
  fmt = ActivationFormat(8, 1, 4)
  xq = np.asarray(clipping.fake_quantize_fmpq(jnp.asarray(x), fmt))

  def loss(ratios):
    s = clipping.scales_from_ratios(jnp.asarray(w), ratios, 4, None)
    wq = np.asarray(clipping.quantize_codes(jnp.asarray(w), s, 4)) * np.asarray(s)
    return float(np.mean((x @ w - xq @ wq) ** 2))

  init = jnp.ones((1, 16))
  learned = clipping.learn_clip_ratios(w, x, 4, None, fmt, steps=100, learning_rate=1e-2, init_ratios=init)
  assert learned.shape == (1, 16) and float(learned.max()) <= 1.0
  assert loss(learned) <= loss(init) * 1.001


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(k=st.sampled_from([8, 16, 32]), n=st.sampled_from([1, 5]), group=st.sampled_from([None, 4, 8]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_mse_clip_never_worse_than_rtn_and_codes_in_range(k, n, group, bits, seed):
  w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) ** 3
  wj = jnp.asarray(w)
  qmax = 2 ** (bits - 1) - 1
  ratios = clipping.mse_clip_ratios(wj, bits, group, grid=4)
  groups = 1 if group is None else k // group
  assert ratios.shape == (groups, n) and float(ratios.min()) >= 0.5 and float(ratios.max()) <= 1.0

  def err(r):
    s = clipping.scales_from_ratios(wj, r, bits, group)
    codes = np.asarray(clipping.quantize_codes(wj, s, bits))
    assert np.abs(codes).max() <= qmax
    return float(np.sum((w - codes * np.repeat(np.asarray(s), k // groups, axis=0)) ** 2))

  rtn_err = err(jnp.ones((groups, n)))
  assert err(ratios) <= rtn_err * (1 + 1e-6) + 1e-9
  # unclipped RTN: every weight within half a step of its code
  s = np.repeat(np.asarray(clipping.scales_from_ratios(wj, jnp.ones((groups, n)), bits, group)), k // groups, axis=0)
  codes = np.asarray(clipping.quantize_codes(wj, jnp.asarray(s[::k // groups]), bits))
  assert np.all(np.abs(w - codes * s) <= s / 2 + 1e-6 * np.abs(w).max())


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(m=st.sampled_from([1, 4]), k8=st.sampled_from([0, 4, 8]), k4=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**16))
def test_fake_quantized_activation_error_is_bounded_per_group(m, k8, k4, seed):
  x = np.random.default_rng(seed).standard_normal((m, k8 + k4)).astype(np.float32)
  fmt = ActivationFormat(4, k8 // 4, (k8 + k4) // 4)
  xq = np.asarray(clipping.fake_quantize_fmpq(jnp.asarray(x), fmt))
  for lo, hi, qmax in ((0, k8, 127), (k8, k8 + k4, 7)):
    if hi > lo:
      step = np.abs(x[:, lo:hi]).max(1, keepdims=True) / qmax
      assert np.all(np.abs(xq[:, lo:hi] - x[:, lo:hi]) <= step / 2 + 1e-6)


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([8, 32]), n=st.sampled_from([1, 6, 7]), shift=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_integer_zero_grid_holds_zero_and_every_weight_within_half_a_step(k, n, shift, seed):
  # integer zero points (GPTQ / QServe): the grid spans [min(w, 0), max(w, 0)], so 0.0 is a code even for a
  # group of one sign, zero codes fit 4 bits, and unclipped RTN rounds every weight by at most half a step
  w = (np.random.default_rng(seed).standard_normal((k, n)) + shift).astype(np.float32)
  wj = jnp.asarray(w)
  scales, zeros = clipping.grid_from_ratios(wj, jnp.ones((k // 8, n)), 4, 8, symmetric=False, integer_zero=True)
  z = np.asarray(zeros)
  assert np.array_equal(z, np.round(z)) and z.min() >= -8 and z.max() <= 7
  codes = np.asarray(clipping.quantize_codes(wj, scales, 4, zeros))
  assert codes.min() >= -8 and codes.max() <= 7
  s = np.repeat(np.asarray(scales), 8, axis=0)
  assert np.all(np.abs(w - (codes - np.repeat(z, 8, axis=0)) * s) <= s / 2 + 1e-5 * np.abs(w).max())
  packed = pack_zero_points(zeros)
  assert packed.dtype == jnp.uint8 and packed.shape == (k // 8, (n + 1) // 2)
  qw = QuantizedWeight(data=pack_int4(jnp.asarray(codes), axis=0), scales=scales, perm=None, bits=4, group_size=8,
                       shape=(k, n), zeros=packed)
  qw.check_arrays()
  np.testing.assert_array_equal(np.asarray(qw.zero_points()), z)


def test_integer_zero_points_are_refused_out_of_range_or_fractional_or_misshapen():
  for bad in (jnp.array([[8.0]]), jnp.array([[-9.0]]), jnp.array([[0.5]]), jnp.zeros((3,))):
    with pytest.raises(ValueError, match="integer zero points"):
      pack_zero_points(bad)
  qw = QuantizedWeight(data=jnp.zeros((4, 6), jnp.uint8), scales=jnp.ones((1, 6)), perm=None, bits=4,
                       group_size=None, shape=(8, 6), zeros=jnp.zeros((1, 4), jnp.uint8))
  with pytest.raises(ValueError, match=r"packed integer zero points uint8 \[1, 3\]"):
    qw.check_arrays()
