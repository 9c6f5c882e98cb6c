"""Calibration statistics (`calib.stats`): reductions over windows, partial batches, NaN detection, windows."""

import jax.numpy as jnp
import numpy as np
import pytest

from calib.stats import calibration_windows, collect_stats
from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.quant import config as qc

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
  from cometjax.quant.tree import linear_layers
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
  m = init_llama(SMALL, seed=1)
  m.layers[0].self_attn.v_proj.kernel.set_value(m.layers[0].self_attn.v_proj.kernel.get_value().at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="layer 'layers.0.self_attn.o_proj' hold NaN/Inf"):
    collect_stats(m, RTN, np.zeros((2, 8), np.int32), progress=False)


def test_calibration_windows_cut_full_windows():
  class Tok:
    def encode(self, text, bos=True):
      return [1] + [ord(c) % 50 + 3 for c in text]
  w = calibration_windows(Tok(), ["abcdefg", "hij"], window=4)
  assert w.shape == (3, 4) and w[0, 0] == 1
  with pytest.raises(ValueError, match="fewer than one window"):
    calibration_windows(Tok(), ["a"], window=8)
