"""The CPU decode forms of quantized layers equal their exact forms: activations dequantized in one pass,
the dequantized W4Ax product (a held `DequantizedWeight`), and
the decode loop that holds them (`hold_dequantized_weights`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from calib.stats import LayerStats
from cometjax import ops
from cometjax.core.formats import (FOLD_INPUT_MAX_FEATURES, ActivationFormat, DequantizedWeight, InputTransformWeight,
                                   dequantized_leaf, reads_the_same_input)
from cometjax.models.llama import LlamaConfig, hold_dequantized_weights, init_llama, shared_input_groups
from cometjax.pallas import quantize_act, w4ax_matmul
from cometjax.quant import config as qc
from cometjax.quant.layer import quantize_layer
from cometjax.quant.transform import quantize
from cometjax.serving.generate import generate


@settings(max_examples=30, deadline=None)
@given(blocks=st.integers(1, 6), int8=st.integers(0, 6), span=st.sampled_from(["block", "region"]),
       rows=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_dequantized_activations_equal_the_packed_codes_times_scales(blocks, int8, span, rows, seed):
  fmt = ActivationFormat(8, min(int8, blocks), blocks, span)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(0, 1, (rows, 8 * blocks)) * rng.uniform(0.1, 30, 8 * blocks), jnp.float32)
  perm = jnp.asarray(rng.permutation(8 * blocks), jnp.int32)
  want = quantize_act.quantize_act_reference(x, perm, fmt).dequantize()
  np.testing.assert_array_equal(quantize_act.dequantized_act_reference(x, perm, fmt), want)


def _layer(config, k=96, n=40, seed=0):
  rng = np.random.default_rng(seed)
  absmax = np.zeros(-(-k // 32) * 32, np.float32)  # statistics cover the zero-padded input
  absmax[:k] = rng.uniform(1, 2, k)
  absmax[[3, 50]] = 30.0
  stats = LayerStats(absmax=absmax, sumsq=absmax.astype(np.float64) ** 2, count=1)
  return quantize_layer("layers.0.mlp.up_proj", rng.normal(0, 0.05, (k, n)), config, stats)


@pytest.mark.parametrize("rotate_int4", [False, "region"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantized_product_equals_the_integer_gemm(rotate_int4, symmetric):
  config = qc.QuantConfig(weights=qc.WeightQuantConfig(group_size=32, symmetric=symmetric),
                          activations=qc.ActivationQuantConfig(int8_fraction=0.25, block_size=16,
                                                               rotate_int4=rotate_int4))
  leaf = _layer(config, k=90)  # padded to 96
  assert isinstance(leaf, InputTransformWeight)
  x = jax.random.normal(jax.random.key(1), (3, 90)) * 4
  exact = ops.linear(x, leaf, implementation="xla")  # 3 rows <= DEQUANTIZED_MAX_ROWS: checked below too
  inner, x_in = leaf.inner, leaf.transform_input(x)
  segments = w4ax_matmul.w4ax_matmul_reference(quantize_act.quantize_act_reference(x_in, inner.perm,
                                                                                   inner.activation), inner)
  held = dequantized_leaf(leaf)
  assert isinstance(held, InputTransformWeight) and isinstance(held.inner, DequantizedWeight)
  assert held.shape == (90, 40)
  folded = dequantized_leaf(leaf, fold_input=True)  # the transform as one [90, 96] matrix
  assert isinstance(folded, DequantizedWeight) and folded.input_matrix.shape == (90, 96) and folded.perm is None
  assert folded.shape == (90, 40)
  scale = float(jnp.max(jnp.abs(segments)))
  for got in (exact, ops.linear(x, held), ops.linear(x, folded)):
    np.testing.assert_allclose(got, segments, atol=2e-5 * scale)


def test_only_small_input_transforms_fold_into_a_matrix():
  config = qc.QuantConfig(weights=qc.WeightQuantConfig(group_size=32),
                          activations=qc.ActivationQuantConfig(int8_fraction=0.25, block_size=32,
                                                               rotate_int4="region"))
  big = _layer(config, k=FOLD_INPUT_MAX_FEATURES + 32)  # a K x Kp product would cost what the layer costs
  assert isinstance(dequantized_leaf(big, fold_input=True), InputTransformWeight)
  small = _layer(config, k=FOLD_INPUT_MAX_FEATURES)
  folded = dequantized_leaf(small, fold_input=True)
  x = jax.random.normal(jax.random.key(5), (4, FOLD_INPUT_MAX_FEATURES)) * 2
  # the matrix is the transform: the same input the inner weight quantizes, up to float32 rounding
  assert small.inner.perm is None  # the permutation is the transform's (else the matrix folds it in too)
  np.testing.assert_allclose(x @ folded.input_matrix, small.transform_input(x), atol=1e-5)


def test_the_decode_loop_holds_dequantized_weights_with_the_same_tokens():
  config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, eos_token_id=None)
  model = quantize(init_llama(config, seed=3), qc.preset("w4a4-kv4").replace(
      weights=qc.WeightQuantConfig(group_size=32)), progress=False)
  prompt = [[5, 9, 17, 33]]
  held = hold_dequantized_weights(quantize(init_llama(config, seed=3), qc.preset("w4a4").replace(
      weights=qc.WeightQuantConfig(group_size=32)), progress=False))
  kernel = held.layers[0].mlp.up_proj.kernel.get_value()
  assert isinstance(kernel, DequantizedWeight)
  # the loop holding dequantized weights (the CPU default) against the same loop on the packed weights
  held_tokens = generate(model, prompt, 12, stop_at_eos=False, dequantize_weights=True).tokens[0]
  packed_tokens = generate(model, prompt, 12, stop_at_eos=False, dequantize_weights=False).tokens[0]
  assert len(set(held_tokens)) > 1  # a constant stream would hide a wrong product
  assert list(held_tokens) == list(packed_tokens)


def _fmpq_model(seed=0):
  """A small Llama quantized with FMPQ (calibration statistics: a permutation and an INT4-region rotation
  per input)."""
  from calib.stats import collect_stats
  config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, eos_token_id=None)
  quant = qc.preset("w4ax-kv4").replace(weights=qc.WeightQuantConfig(group_size=32, symmetric=False))
  model = init_llama(config, seed=seed)
  windows = np.random.default_rng(seed).integers(0, 128, (2, 32)).astype(np.int32)
  return quantize(model, quant, stats=collect_stats(model, quant, windows, progress=False), progress=False)


def test_shared_input_groups_pair_the_projections_of_one_input_and_only_those():
  model = _fmpq_model()
  attn = model.layers[0].self_attn
  assert isinstance(attn.q_proj.kernel.get_value(), InputTransformWeight)
  groups = shared_input_groups(model)
  assert (("layers", 0, "self_attn", "q_proj"), ("layers", 0, "self_attn", "k_proj"),
          ("layers", 0, "self_attn", "v_proj")) in groups
  assert (("layers", 1, "mlp", "gate_proj"), ("layers", 1, "mlp", "up_proj")) in groups
  assert len(groups) == 4  # o_proj and down_proj read inputs of their own
  assert shared_input_groups(model) is groups  # remembered while the kernels' arrays are the same objects
  # another permutation is another input plan: v_proj leaves the group (the replaced kernel is noticed)
  v = attn.v_proj.kernel.get_value()
  attn.v_proj.kernel.set_value(dataclasses.replace(v, perm=v.perm[jnp.r_[1, 0, 2:v.perm.shape[0]]]))
  assert not reads_the_same_input(attn.q_proj.kernel.get_value(), attn.v_proj.kernel.get_value())
  assert ("layers", 0, "self_attn", "v_proj") not in {path for group in shared_input_groups(model) for path in group}
  float_model = init_llama(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1,
                                       num_heads=4, num_kv_heads=2))
  assert shared_input_groups(float_model) == ()


def test_a_shared_input_is_quantized_once_with_the_same_products(monkeypatch):
  model = _fmpq_model(seed=1)
  x = jax.random.normal(jax.random.key(2), (3, 1, 64)) * 3
  calls = []
  exact = quantize_act.dequantized_act_reference
  monkeypatch.setattr(quantize_act, "dequantized_act_reference", lambda *args: calls.append(1) or exact(*args))
  names = ("q_proj", "k_proj", "v_proj")
  alone = hold_dequantized_weights(nnx.clone(model)).layers[0].self_attn
  want = [ops.linear(x, getattr(alone, name).kernel.get_value()) for name in names]
  assert len(calls) == 3
  calls.clear()
  shared = hold_dequantized_weights(nnx.clone(model), shared_input_groups(model)).layers[0].self_attn
  kernels = [getattr(shared, name).kernel.get_value() for name in names]
  got = ops.linears(x, kernels)
  assert len(calls) == 1  # one quantized input serves the three projections
  assert kernels[0].joint_outputs == (64, 32, 32)  # ... multiplied with the three weights side by side
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  separate = ops.linears(x, [dataclasses.replace(kernels[0], joint_weight=None)] + kernels[1:])
  for g, w in zip(got, separate):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  # another order (k and v have one width) or a part of the group: each output still its own projection's
  swapped = ops.linears(x, [kernels[0], kernels[2], kernels[1]])
  for g, w in zip(swapped, [want[0], want[2], want[1]]):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ops.linears(x, kernels[:2])[1], want[1], rtol=1e-6, atol=1e-6)
  # the decode loop that shares them still produces the packed model's tokens
  prompt = [[5, 9, 17]]
  assert (generate(model, prompt, 10, stop_at_eos=False, dequantize_weights=True).tokens
          == generate(model, prompt, 10, stop_at_eos=False, dequantize_weights=False).tokens)
