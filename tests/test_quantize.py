"""quantize(): configs and presets, per-layer formats, padding, rotation, save/load, bad input."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calib.pipeline import calibrate_and_quantize
from calib.stats import LayerStats, collect_stats
from cometjax import ops
from cometjax.checkpoint.quantized import load_quantized, save_quantized
from cometjax.core.formats import InputTransformWeight, QuantizedWeight, dequantize_weight
from cometjax.core.kv_config import KVQuantConfig
from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.quant import config as qc, rotation
from cometjax.quant.layer import quantize_layer
from cometjax.quant.report import quantization_report
from cometjax.quant.transform import quantize
from cometjax.quant.tree import linear_layers

# 44 = intermediate width that is not a multiple of the FMPQ block (16 auto): exercises padding
SMALL = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=44, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
  m = init_llama(SMALL, seed=0)
  # non-trivial norm weights so that folding them is tested
  _, state = nnx.split(m)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  for i in range(SMALL.num_layers):
    for norm in ("input_layernorm", "post_attention_layernorm"):
      pure["layers"][i][norm]["weight"] = jnp.asarray(rng.uniform(0.5, 1.5, SMALL.hidden_size), jnp.float32)
  pure["norm"]["weight"] = jnp.asarray(rng.uniform(0.5, 1.5, SMALL.hidden_size), jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  return m


@pytest.fixture(scope="module")
def windows():
  return np.random.default_rng(1).integers(0, SMALL.vocab_size, size=(6, 32)).astype(np.int32)


TOKENS = jnp.asarray(np.random.default_rng(2).integers(0, 64, size=(2, 16)), jnp.int32)


def logits(m):
  return np.asarray(m(TOKENS)[0])


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# configs


def test_every_preset_builds_and_kv4_names_the_cache():
  for name in qc.PRESETS:
    config = qc.preset(name)
    assert config.name == name
    assert (config.kv is not None) == name.endswith("-kv4")
    if config.kv is not None:
      assert isinstance(config.kv, KVQuantConfig)
    assert qc.config_from_dict(config.to_dict()) == config


def test_unknown_preset_lists_presets():
  with pytest.raises(ValueError, match="unknown preset 'w3a3'.*w4ax-kv4"):
    qc.preset("w3a3")


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "weights.bits"), (dict(method="awq"), "weights.method"), (dict(group_size=7), "group_size"),
    (dict(integer_zero=True), "integer_zero"), (dict(integer_zero=True, symmetric=False, bits=8), "integer_zero")])
def test_bad_weight_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    qc.WeightQuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(int8_fraction=1.5), "int8_fraction"), (dict(block_size=12.0), "block_size"),
    (dict(bits=2), "activations.bits"), (dict(ranking="p99"), "ranking"), (dict(outlier_ratio=0.5), "outlier")])
def test_bad_activation_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    qc.ActivationQuantConfig(**kwargs)


def test_bad_quant_config():
  with pytest.raises(ValueError, match="rotation"):
    qc.QuantConfig(rotation="givens")
  with pytest.raises(ValueError, match="kv must be"):
    qc.QuantConfig(kv={"k_mode": "channel"})
  with pytest.raises(ValueError, match="weights must not be None"):
    qc.QuantConfig(weights=None, activations=qc.ActivationQuantConfig())


def test_keep_float_patterns():
  config = qc.preset("w4a16").replace(keep_float=("lm_head", "layers.0.*"))
  assert not config.quantizes("layers.0.mlp.down_proj")
  assert config.quantizes("layers.1.mlp.down_proj")
  assert not config.quantizes("lm_head")


def test_auto_block_size():
  acts = qc.ActivationQuantConfig()
  assert [acts.block_size_for(k) for k in (64, 172, 576, 2048, 4096, 11008, 8)] == [4, 8, 32, 128, 128, 128, 4]


# ------------------------------------------------------------------------------------------------
# quantize


@pytest.mark.slow
def test_w4a16_rtn_leaves_bytes_and_accuracy(model):
  q = quantize(model, qc.preset("w4a16").replace(weights=qc.WeightQuantConfig(method="rtn")), progress=False)
  _, state = nnx.split(q)
  pure = nnx.to_pure_dict(state)
  for name, path in linear_layers(pure).items():
    leaf = pure
    for k in path:
      leaf = leaf[k]
    assert isinstance(leaf["kernel"], QuantizedWeight), name
  report = quantization_report(q)
  # 4-bit codes + one f32 scale per output channel: 0.5 + 4 / K bytes per parameter of the quantized layers
  assert 0.5 < report["weight_bytes_per_param"] < 0.5 + 4 / 32 + 1e-9
  # over the whole model the float embedding and norms count too, every array once
  every_array = sum(int(a.nbytes) for a in jax.tree.leaves(pure))
  assert report["total_bytes"] == every_array and report["params"] == sum(
      int(a.size) for a in jax.tree.leaves(nnx.to_pure_dict(nnx.split(model)[1])))
  assert rel_err(logits(q), logits(model)) < 0.3


@pytest.mark.slow
def test_w8a8_is_close_to_float(model):
  q = quantize(model, qc.preset("w8a8"), progress=False)
  assert rel_err(logits(q), logits(model)) < 0.02


def test_fmpq_needs_stats(model):
  with pytest.raises(ValueError, match="stats are required"):
    quantize(model, qc.preset("w4ax").replace(weights=qc.WeightQuantConfig(method="rtn")), progress=False)


def test_stats_missing_for_a_layer(model, windows):
  config = qc.preset("w4ax").replace(weights=qc.WeightQuantConfig(method="rtn"))
  stats = collect_stats(model, config, windows, batch_size=4, progress=False)
  del stats.layers["layers.1.mlp.up_proj"]
  with pytest.raises(ValueError, match="stats are missing for layer 'layers.1.mlp.up_proj'"):
    quantize(model, config, stats, progress=False)


def test_stats_from_another_rotation_are_refused(model, windows):
  config = qc.preset("w4ax").replace(weights=qc.WeightQuantConfig(method="rtn"))
  stats = collect_stats(model, config, windows, batch_size=4, progress=False)
  with pytest.raises(ValueError, match="rotation"):
    quantize(model, config.replace(rotation="hadamard"), stats, progress=False)


def test_already_quantized_model_is_refused(model):
  q = quantize(model, qc.preset("w8a8"), progress=False)
  with pytest.raises(ValueError, match="already quantized"):
    quantize(q, qc.preset("w8a8"), progress=False)


def test_nan_kernel_raises():
  w = np.ones((32, 8), np.float32)
  w[3, 2] = np.nan
  with pytest.raises(ValueError, match="layer 'x.q_proj'.*NaN"):
    quantize_layer("x.q_proj", w, qc.preset("w4a16").replace(weights=qc.WeightQuantConfig(method="rtn")))


def test_group_size_that_does_not_divide_pads_to_a_common_multiple():
  # K=40, group 16: padded to 48 (zero rows), the result still matches the float product closely
  config = qc.QuantConfig(weights=qc.WeightQuantConfig(bits=8, group_size=16))
  w = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
  leaf = quantize_layer("l", w, config)
  assert isinstance(leaf, InputTransformWeight) and leaf.inner.in_features == 48
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 40)), jnp.float32)
  np.testing.assert_allclose(ops.linear(x, leaf, implementation="xla"), x @ w, rtol=0.02, atol=0.05)
  with pytest.raises(ValueError, match="x must have 40 channels"):
    ops.linear(x[:, :32], leaf, implementation="xla")


# blocks of 8 (the tests below check padding and permutation with them; the auto rule would pick 4 here)
FMPQ_RTN = qc.QuantConfig(weights=qc.WeightQuantConfig(method="rtn"),
                          activations=qc.ActivationQuantConfig(int8_fraction=0.25, block_size=8))


def test_padded_fmpq_layer_equals_unpadded_math(model, windows):
  """down_proj has K=44, blocks of 8, padded to 48 with zeros; equals fake-quant math on the real 44."""
  from cometjax.core.formats import dequantize_weight
  from cometjax.quant.clipping import fake_quantize_fmpq as fake_quantize_activation
  config = FMPQ_RTN
  stats = collect_stats(model, config, windows, batch_size=4, progress=False)
  q = quantize(model, config, stats, progress=False)
  leaf = q.layers[0].mlp.down_proj.kernel.get_value()
  assert isinstance(leaf, InputTransformWeight)
  inner = leaf.inner
  assert inner.in_features == 48 and inner.activation.block_size == 8 and inner.activation.num_int8_blocks == 1
  assert set(np.asarray(inner.perm)[-4:]) == {44, 45, 46, 47}  # the padding sits in the last INT4 block
  x = jnp.asarray(np.random.default_rng(3).standard_normal((7, 44)), jnp.float32)
  xp = jnp.pad(x, ((0, 0), (0, 4)))
  expected = fake_quantize_activation(xp[:, np.asarray(inner.perm)] if inner.perm is not None else xp,
                                      inner.activation) @ dequantize_weight(inner)
  np.testing.assert_allclose(ops.linear(x, leaf, implementation="xla"), expected, rtol=1e-5, atol=1e-5)


def test_fmpq_int4_fraction_and_permuted_outliers(model, windows):
  config = FMPQ_RTN
  stats = collect_stats(model, config, windows, batch_size=4, progress=False)
  q = quantize(model, config, stats, progress=False)
  report = quantization_report(q)
  assert report["int4_block_fraction"] >= 0.75
  leaf = q.layers[1].self_attn.q_proj.kernel.get_value()  # K=32: 4 blocks of 8, one INT8
  assert leaf.activation.num_int8_blocks == 1
  top = np.argsort(-stats.layer("layers.1.self_attn.q_proj").absmax)[:8]
  assert set(np.asarray(leaf.perm)[:8]) == set(top)


def test_int4_region_rotation_keeps_int8_channels_and_matches_its_math(model, windows):
  from cometjax.core.formats import dequantize_weight
  from cometjax.quant.clipping import fake_quantize_fmpq as fake_quantize_activation
  config = qc.preset("w4ax").replace(weights=qc.WeightQuantConfig(method="rtn"))
  assert config.activations.rotate_int4
  stats = collect_stats(model, config, windows, batch_size=4, progress=False)
  q = quantize(model, config, stats, progress=False)
  leaf = q.layers[1].self_attn.q_proj.kernel.get_value()
  assert isinstance(leaf, InputTransformWeight) and leaf.inner.perm is None and leaf.rotation is None
  # K=32: one INT8 block of 8, one signed Hadamard block (24 = 2 * Paley 12) over the 24 INT4 channels
  assert leaf.region_start == 8 and (leaf.region.features, leaf.region.block) == (24, 24)
  assert leaf.rotation_nbytes == 24  # only the int8 signs are stored
  np.testing.assert_allclose(leaf.region.matrix() @ leaf.region.matrix().T, np.eye(24), atol=1e-12)
  top = np.argsort(-stats.layer("layers.1.self_attn.q_proj").absmax)[:8]
  assert set(np.asarray(leaf.perm)[:8]) == set(top)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 32)), jnp.float32)
  xt = leaf.transform_input(x)
  np.testing.assert_array_equal(xt[:, :8], x[:, np.asarray(leaf.perm)[:8]])  # INT8 channels untouched
  np.testing.assert_allclose(np.linalg.norm(xt, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
  expected = fake_quantize_activation(xt, leaf.inner.activation) @ dequantize_weight(leaf.inner)
  np.testing.assert_allclose(ops.linear(x, leaf, implementation="xla"), expected, rtol=1e-4, atol=1e-4)


def test_int4_rotations_are_hadamard_blocks_of_the_region_or_of_each_block():
  from cometjax.core.formats import ActivationFormat
  from cometjax.quant.layer import int4_rotation
  fmt = ActivationFormat(128, 8, 32)  # K4 = 3072
  assert (int4_rotation(fmt, "region").features, int4_rotation(fmt, "region").block) == (3072, 1024)
  assert int4_rotation(fmt, "block").block == 128
  # K4 = 448 = 2 * 224 has a Hadamard matrix, but its Paley factor is too large for a fast transform: 7 x 64
  assert int4_rotation(ActivationFormat(64, 2, 9), "region").block == 64
  assert int4_rotation(ActivationFormat(64, 9, 9), "region") is None  # no INT4 channel
  with pytest.raises(ValueError, match="Hadamard matrix of the block size 10"):
    int4_rotation(ActivationFormat(10, 1, 4), "block")


def test_rotation_is_exact_in_float(model):
  rotated = rotation.rotate_llama(model)
  assert rotated.lm_head is not None  # the tied head becomes explicit
  np.testing.assert_allclose(logits(rotated), logits(model), atol=2e-4)


def test_rotation_with_w8a8_stays_close(model):
  q = quantize(model, qc.preset("w8a8").replace(rotation="hadamard"), progress=False)
  down = q.layers[0].mlp.down_proj.kernel.get_value()
  assert isinstance(down, InputTransformWeight) and down.rotation is not None
  assert rel_err(logits(q), logits(model)) < 0.02


def _save_load_configs():
  w4ax = qc.preset("w4ax-kv4")
  assert not w4ax.weights.symmetric  # the preset's asymmetric weights are the first case
  symmetric = w4ax.replace(weights=qc.WeightQuantConfig(method="gptq", group_size=32),
                           activations=qc.ActivationQuantConfig(int8_fraction=0.25, rotate_int4="block"),
                           embedding_bits=8)
  integer_zero = qc.WeightQuantConfig(group_size=32, symmetric=False, integer_zero=True, scale_dtype="float16")
  return {"w4ax-kv4 hadamard": w4ax.replace(rotation="hadamard"), "w4a16 integer-zero bf16-embedding":
          qc.preset("w4a16").replace(weights=integer_zero, embedding_bits=16),
          "w4ax-kv4 symmetric block-rotation int8-embedding": symmetric}


def _safetensors_data_bytes(path) -> int:
  """The tensor data of a safetensors file: its size less the 8-byte length and the JSON header."""
  with open(path, "rb") as f:
    header = int.from_bytes(f.read(8), "little")
  return path.stat().st_size - 8 - header


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_save_load_configs()))
def test_save_load_is_bit_exact(model, windows, tmp_path, name):
  config = _save_load_configs()[name]
  q, _ = calibrate_and_quantize(model, config, windows, batch_size=4, progress=False)
  save_quantized(tmp_path / "q", q, config)
  # every byte the report counts is on disk, and nothing else but the JSON metadata
  assert _safetensors_data_bytes(tmp_path / "q" / "model.safetensors") == quantization_report(q)["total_bytes"]
  loaded = load_quantized(tmp_path / "q")
  assert loaded.quant_config == config
  assert loaded.config == q.config
  a = jax.tree.leaves(nnx.to_pure_dict(nnx.split(q)[1]))
  b = jax.tree.leaves(nnx.to_pure_dict(nnx.split(loaded.model)[1]))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_array_equal(logits(loaded.model), logits(q))


def test_load_quantized_rejects_other_directories(tmp_path):
  with pytest.raises(ValueError, match="quantization.json"):
    load_quantized(tmp_path)


def test_bf16_embedding_halves_its_bytes_and_stays_close(model):
  rtn = qc.preset("w4a16").replace(weights=qc.WeightQuantConfig(group_size=32))
  q32 = quantize(model, rtn, progress=False)
  q16 = quantize(model, rtn.replace(embedding_bits=16), progress=False)
  assert q16.embed_tokens.get_value().dtype == jnp.bfloat16
  r32, r16 = quantization_report(q32), quantization_report(q16)
  assert 2 * r16["embedding_bytes"] == r32["embedding_bytes"]
  assert rel_err(logits(q16), logits(q32)) < 0.01


def test_group_aligned_permutation_keeps_an_asymmetric_grid_exactly():
  # a weight already on a 4-bit grid per 32 inputs (GGUF Q4_1: w = d q + m): permuting whole groups and
  # asymmetric RTN in float32 give back the same grid; single-channel permutations mix the groups
  rng = np.random.default_rng(0)
  k, n, group = 256, 48, 32
  d = rng.uniform(0.01, 0.05, (k // group, 1, n))
  m = rng.uniform(-0.4, -0.1, (k // group, 1, n))
  q = rng.integers(0, 16, (k // group, group, n))
  q[:, 0], q[:, 1] = 0, 15  # each group spans its whole range, as Q4_1 blocks do
  kernel = (d * q + m).reshape(k, n)
  absmax = rng.uniform(1, 2, k).astype(np.float32)
  absmax[[5, 77, 200]] = 40.0
  stats = LayerStats(absmax=absmax, sumsq=absmax.astype(np.float64) ** 2, count=1)
  errors = {}
  for unit in (1, group):
    config = qc.QuantConfig(weights=qc.WeightQuantConfig(group_size=group, symmetric=False),
                            activations=qc.ActivationQuantConfig(int8_fraction=0.25, block_size=64,
                                                                 permute_unit=unit))
    qw = quantize_layer("layers.0.mlp.up_proj", kernel, config, stats)
    assert qw.activation.num_int8_blocks == 1 and qw.perm is not None
    w = np.asarray(dequantize_weight(qw, original_order=True), np.float64)
    errors[unit] = np.abs(w - kernel).max() / np.abs(kernel).max()
  assert errors[group] < 1e-5 < 1e-2 < errors[1]
