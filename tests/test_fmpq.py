"""FMPQ plans: input padding, channel ranking, INT8 block counts, Hadamard construction (hypothesis)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from calib.stats import LayerStats
from cometjax.core import rotations
from cometjax.quant import config as qc, fmpq


def _stats(absmax):
  absmax = np.asarray(absmax, np.float32)
  return LayerStats(absmax=absmax, sumsq=absmax.astype(np.float64) ** 2, count=1)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 300), fraction=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
       block=st.sampled_from([None, 2, 8, 16]), seed=st.integers(0, 2**16))
def test_plan_is_a_permutation_with_top_channels_in_int8_blocks(k, fraction, block, seed):
  config = qc.QuantConfig(activations=qc.ActivationQuantConfig(int8_fraction=fraction, block_size=block))
  plan = fmpq.input_plan("layers.0.mlp.up_proj", k, config)
  b = plan.block_size
  assert plan.padded_features % b == 0 and plan.padded_features - k < max(b, 2)
  absmax = np.random.default_rng(seed).permutation(np.arange(1, plan.padded_features + 1)).astype(np.float32)
  absmax[k:] = 0.0  # padding channels are zero
  act = fmpq.plan_activation("l", plan, config.activations, _stats(absmax))
  num_blocks = plan.padded_features // b
  assert act.format.num_blocks == num_blocks
  assert act.format.num_int8_blocks == int(np.floor(fraction * num_blocks + 1e-9))
  assert act.format.int4_block_fraction >= 1 - fraction - 1e-9
  if act.perm is None:
    assert act.format.num_int8_blocks == 0
    return
  perm = np.asarray(act.perm)
  assert sorted(perm.tolist()) == list(range(plan.padded_features))
  n8 = act.format.int8_channels
  # every INT8 channel is at least as large as every INT4 channel
  if n8 < plan.padded_features:
    assert absmax[perm[:n8]].min() >= absmax[perm[n8:]].max()


@settings(max_examples=30, deadline=None)
@given(runs=st.integers(4, 40), unit=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16))
def test_permute_unit_moves_whole_runs_ranked_by_their_largest_channel(runs, unit, seed):
  acts = qc.ActivationQuantConfig(int8_fraction=0.25, block_size=2 * unit, permute_unit=unit)
  k = runs * unit
  plan = fmpq.input_plan("x", k, qc.QuantConfig(activations=acts))
  absmax = np.random.default_rng(seed).permutation(np.arange(1, plan.padded_features + 1)).astype(np.float32)
  absmax[k:] = 0.0
  act = fmpq.plan_activation("x", plan, acts, _stats(absmax))
  if act.perm is None:
    return
  perm = np.asarray(act.perm)
  assert sorted(perm.tolist()) == list(range(plan.padded_features))
  chunks = perm.reshape(-1, unit)  # every run of `unit` final channels is one aligned run of the input
  assert np.all(chunks[:, 0] % unit == 0) and np.all(np.diff(chunks, axis=1) == 1)
  n8 = act.format.int8_channels
  run_max = absmax[perm].reshape(-1, unit).max(axis=1)
  assert run_max[:n8 // unit].min() >= run_max[n8 // unit:].max()


def test_permute_unit_must_divide_the_block():
  with pytest.raises(ValueError, match="permute_unit=32 must divide block_size=48"):
    qc.ActivationQuantConfig(block_size=48, permute_unit=32)


def test_outlier_ratio_uses_only_the_blocks_needed():
  acts = qc.ActivationQuantConfig(int8_fraction=0.5, block_size=8, outlier_ratio=6.0)
  absmax = np.ones(64, np.float32)
  absmax[[3, 40]] = 50.0  # two outlier channels: one INT8 block suffices
  plan = fmpq.input_plan("x", 64, qc.QuantConfig(activations=acts))
  act = fmpq.plan_activation("x", plan, acts, _stats(absmax))
  assert act.format.num_int8_blocks == 1
  assert set(np.asarray(act.perm)[:8]) >= {3, 40}


def test_bits8_and_plain_int4_need_no_stats():
  for acts, all_int8 in ((qc.ActivationQuantConfig(bits=8), True), (qc.ActivationQuantConfig(bits=4), False)):
    plan = fmpq.input_plan("x", 64, qc.QuantConfig(activations=acts))
    act = fmpq.plan_activation("x", plan, acts, None)
    assert act.perm is None and act.format.num_blocks == 16
    assert act.format.num_int8_blocks == (16 if all_int8 else 0)


def test_mixed_plan_without_stats_names_the_layer():
  acts = qc.ActivationQuantConfig(int8_fraction=0.25)
  plan = fmpq.input_plan("layers.2.self_attn.o_proj", 64, qc.QuantConfig(activations=acts))
  with pytest.raises(ValueError, match="stats are missing for layer 'layers.2.self_attn.o_proj'"):
    fmpq.plan_activation("layers.2.self_attn.o_proj", plan, acts, None)


def test_stats_of_the_wrong_width_are_refused():
  acts = qc.ActivationQuantConfig(int8_fraction=0.25)
  plan = fmpq.input_plan("x", 64, qc.QuantConfig(activations=acts))
  with pytest.raises(ValueError, match="cover 32 channels"):
    fmpq.plan_activation("x", plan, acts, _stats(np.ones(32)))


def test_online_rotation_pads_to_a_hadamard_size():
  config = qc.QuantConfig(activations=qc.ActivationQuantConfig(), rotation="hadamard")
  plan = fmpq.input_plan("layers.0.mlp.down_proj", 172, config)
  assert plan.online_rotation and plan.padded_features == 176 and plan.block_size == 8
  assert not fmpq.input_plan("layers.0.mlp.up_proj", 64, config).online_rotation


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 200))
def test_hadamard_matrices_are_orthogonal(n):
  if not rotations.hadamard_exists(n):
    with pytest.raises(ValueError, match="no Hadamard matrix"):
      rotations.hadamard_pm1(n)
    n = rotations.hadamard_size_at_least(n)
  h = rotations.hadamard_pm1(n)
  assert set(np.unique(h)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
  r = rotations.random_hadamard(n, seed=3)
  np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)


def test_hadamard_sizes():
  assert rotations.hadamard_size_at_least(172) == 176
  assert rotations.hadamard_size_at_least(172, multiple_of=32) == 192
  with pytest.raises(ValueError, match="positive"):
    rotations.hadamard_size_at_least(0)
