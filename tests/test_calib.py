"""Calibration: activation statistics, clip searches (learned and grid), GPTQ; quantizer invariants."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from calib import clipping, gptq
from calib.stats import calibration_windows, collect_stats
from cometjax import config as qc
from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.qtypes import ActivationFormat

SMALL = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
RTN = qc.QuantConfig(weights=qc.WeightQuantConfig(method="rtn"), activations=qc.ActivationQuantConfig(int8_fraction=0.25))


@pytest.fixture(scope="module")
def model():
  return init_llama(SMALL, seed=0)


def _captured_inputs(model, tokens):
  """The input of every linear layer, by a plain eager forward pass with recording kernels."""
  from flax import nnx
  from calib.stats import _SINKS, CaptureWeight
  from cometjax.quantize import linear_layers
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name, path in linear_layers(pure).items():
    node = pure
    for k in path:
      node = node[k]
    node["kernel"] = CaptureWeight(kernel=node["kernel"], name=name)
  nnx.replace_by_pure_dict(state, pure)
  sink = []
  _SINKS.append(sink)
  try:
    nnx.merge(graphdef, state)(jnp.asarray(tokens))
  finally:
    _SINKS.pop()
  return {name: np.asarray(x).reshape(-1, x.shape[-1]) for name, x in sink}


def test_stats_match_direct_reductions_and_partial_batches(model):
  windows = np.random.default_rng(0).integers(0, 64, size=(3, 16)).astype(np.int32)
  stats = collect_stats(model, RTN, windows, batch_size=2, hessian=True, max_samples=20, progress=False)
  assert stats.num_tokens == 48
  inputs = _captured_inputs(model, windows)
  for name, x in inputs.items():
    s = stats.layer(name)
    np.testing.assert_allclose(s.absmax, np.abs(x).max(0), rtol=1e-5)
    np.testing.assert_allclose(s.sumsq, (x.astype(np.float64) ** 2).sum(0), rtol=1e-4)
    np.testing.assert_allclose(s.hessian, x.T.astype(np.float64) @ x, rtol=1e-4, atol=1e-4)
    assert s.samples.shape == (20, x.shape[1])


def test_stats_reject_bad_windows(model):
  with pytest.raises(ValueError, match="token ids outside"):
    collect_stats(model, RTN, np.full((2, 8), 64), progress=False)
  with pytest.raises(ValueError, match="windows must be a non-empty int array"):
    collect_stats(model, RTN, np.zeros((2, 8), np.float32), progress=False)


def test_nan_in_calibration_activations_names_the_layer():
  from flax import nnx
  m = init_llama(SMALL, seed=1)
  m.layers[0].self_attn.v_proj.kernel.set_value(m.layers[0].self_attn.v_proj.kernel.get_value().at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="layer 'layers.0.self_attn.o_proj' hold NaN/Inf"):
    collect_stats(m, RTN, np.zeros((2, 8), np.int32), progress=False)


def test_nan_in_calibration_samples_raises():
  w = np.ones((8, 4), np.float32)
  x = np.ones((5, 8), np.float32)
  x[1, 1] = np.nan
  with pytest.raises(ValueError, match="calibration activations x holds NaN"):
    clipping.learn_clip_ratios(w, x, 4, None, steps=2)
  with pytest.raises(ValueError, match="hessian holds NaN"):
    gptq.gptq_codes(w, np.full((8, 8), np.nan), np.ones((1, 4)), 4)


def test_calibration_windows_cut_full_windows():
  class Tok:
    def encode(self, text, bos=True):
      return [1] + [ord(c) % 50 + 3 for c in text]
  w = calibration_windows(Tok(), ["abcdefg", "hij"], window=4)
  assert w.shape == (3, 4) and w[0, 0] == 1
  with pytest.raises(ValueError, match="fewer than one window"):
    calibration_windows(Tok(), ["a"], window=8)


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
  xq = np.asarray(clipping.fake_quantize_activation(jnp.asarray(x), fmt))

  def loss(ratios):
    s = clipping.scales_from_ratios(jnp.asarray(w), ratios, 4, None)
    wq = np.asarray(clipping.quantize_codes(jnp.asarray(w), s, 4)) * np.asarray(s)
    return float(np.mean((x @ w - xq @ wq) ** 2))

  init = jnp.ones((1, 16))
  learned = clipping.learn_clip_ratios(w, x, 4, None, fmt, steps=100, learning_rate=1e-2, init_ratios=init)
  assert learned.shape == (1, 16) and float(learned.max()) <= 1.0
  assert loss(learned) <= loss(init) * 1.001


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


@settings(max_examples=15, deadline=None)
@given(m=st.sampled_from([1, 4]), k8=st.sampled_from([0, 4, 8]), k4=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**16))
def test_fake_quantized_activation_error_is_bounded_per_group(m, k8, k4, seed):
  x = np.random.default_rng(seed).standard_normal((m, k8 + k4)).astype(np.float32)
  fmt = ActivationFormat(4, k8 // 4, (k8 + k4) // 4)
  xq = np.asarray(clipping.fake_quantize_activation(jnp.asarray(x), fmt))
  for lo, hi, qmax in ((0, k8, 127), (k8, k8 + k4, 7)):
    if hi > lo:
      step = np.abs(x[:, lo:hi]).max(1, keepdims=True) / qmax
      assert np.all(np.abs(xq[:, lo:hi] - x[:, lo:hi]) <= step / 2 + 1e-6)
