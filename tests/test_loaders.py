"""Loader errors name the tensor / field; tiny synthetic checkpoints written here."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cometjax.checkpoint import load
from cometjax.checkpoint.hf import config_from_hf, hf_tensor_names
from cometjax.checkpoint.llama2c import read_llama2c
from cometjax.errors import CheckpointError
from cometjax.models.llama import LlamaConfig, init_llama

HF_CONFIG = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=64)


def write_hf(directory, config=HF_CONFIG, drop=None, reshape=None, shards=1):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  cfg = config_from_hf(config)
  rng = np.random.default_rng(0)
  tensors = {n: rng.normal(0, 0.1, shape).astype(np.float32) for n, (_, shape, _) in hf_tensor_names(cfg).items()}
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = tensors[reshape][:-1]
  if shards == 1:
    save_file(tensors, str(directory / "model.safetensors"))
  else:
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
      file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: tensors[n] for n in names[s::shards]}
      save_file(part, str(directory / file))
      weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return tensors


def test_sharded_equals_single(tmp_path):
  write_hf(tmp_path / "one")
  write_hf(tmp_path / "three", shards=3)
  tokens = np.array([[1, 5, 9, 33]])
  a, _ = load(tmp_path / "one").model(tokens)
  b, _ = load(tmp_path / "three").model(tokens)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_tensor_is_named(tmp_path):
  write_hf(tmp_path, drop="model.layers.1.mlp.up_proj.weight")
  with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    load(tmp_path)


def test_wrong_shape_is_named(tmp_path):
  write_hf(tmp_path, reshape="model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[7, 16\]"):
    load(tmp_path)


def test_missing_shard_is_named(tmp_path):
  write_hf(tmp_path, shards=2)
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
    load(tmp_path)


def test_truncated_safetensors(tmp_path):
  write_hf(tmp_path)
  path = tmp_path / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="cannot read weight file"):
    load(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
  tensors = write_hf(tmp_path)
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
    load(tmp_path)


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gemma"), "model_type 'gemma' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "rope_type='yarn'"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
])
def test_unsupported_config_fields_are_named(change, match):
  with pytest.raises(CheckpointError, match=match):
    config_from_hf({**HF_CONFIG, **change})


def test_v4_style_rope_scaling_is_read():
  cfg = config_from_hf({**HF_CONFIG, "rope_theta": 5e5, "rope_scaling": dict(
      rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)})
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0


def _llama2c_bytes(dim=8, hidden=12, layers=1, heads=2, kv=1, vocab=16, seq=8, shared=True):
  hd = dim // heads
  n = vocab * dim + layers * (2 * dim + dim * dim * 2 + 2 * kv * hd * dim + 3 * hidden * dim) + dim + seq * hd
  n += 0 if shared else vocab * dim
  header = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if shared else -vocab, seq)
  return header + np.random.default_rng(0).normal(0, 0.1, n).astype("<f4").tobytes()


def test_llama2c_roundtrip_and_truncation(tmp_path):
  path = tmp_path / "m.bin"
  path.write_bytes(_llama2c_bytes(shared=False))
  config, tensors = read_llama2c(path)
  assert config.tie_word_embeddings is False and "lm_head.weight" in tensors
  assert load(path).tokenizer is None
  path.write_bytes(_llama2c_bytes()[:-40])
  with pytest.raises(CheckpointError, match="truncated: tensor 'freq_cis_imag'"):
    read_llama2c(path)
  path.write_bytes(_llama2c_bytes() + b"\0" * 8)
  with pytest.raises(CheckpointError, match="trailing bytes"):
    read_llama2c(path)


def test_unknown_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load(tmp_path / "nope")
  (tmp_path / "weights.pt").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
    load(tmp_path / "weights.pt")
  with pytest.raises(CheckpointError, match="no config.json"):
    load(tmp_path)


@pytest.mark.slow
def test_bfloat16_model_runs_and_stays_close():
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
  f32 = init_llama(config, seed=0)
  bf16 = init_llama(config.replace(dtype=jnp.bfloat16), seed=0)
  nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32)))  # same weights, rounded
  tokens = np.array([[1, 2, 3, 4, 5]])
  a, _ = f32(tokens)
  b, _ = bf16(tokens)
  assert b.dtype == jnp.float32  # logits are returned in float32
  assert bf16.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(hidden_size=30), "divisible by num_heads"),
    (dict(model_type="gpt2"), "model_type"),
])
def test_bad_config(kwargs, match):
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
  with pytest.raises(ValueError, match=match):
    LlamaConfig(**{**base, **kwargs})
