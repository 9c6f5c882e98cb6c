"""Tensor parallelism on 8 fake CPU devices (a subprocess: the device count is fixed at jax start-up)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
  import numpy as np, jax
  jax.config.update("jax_default_matmul_precision", "highest")
  from flax import nnx
  from cometjax.core.formats import ActivationFormat, quantize_weight
  from cometjax.core.kv_config import KVQuantConfig
  from cometjax.models.llama import LlamaConfig, init_llama
  from cometjax.serving.generate import generate
  from cometjax.serving.sharding import make_mesh, shard_model

  assert len(jax.devices()) == 8, jax.devices()
  config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                       num_kv_heads=4, tie_word_embeddings=False, eos_token_id=None)
  model = init_llama(config, seed=0)

  def quantized(model):  # W4A4 (one INT8 block of 32 channels) on every projection
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for layer in pure["layers"].values():
      for block in ("self_attn", "mlp"):
        for name, proj in layer[block].items():
          w = proj["kernel"]
          fmt = ActivationFormat(32, 1, w.shape[0] // 32)
          proj["kernel"] = quantize_weight(w, 4, activation=fmt, perm=np.random.default_rng(0).permutation(w.shape[0]))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)

  tokens = np.random.default_rng(1).integers(0, 128, (2, 12))
  for name, m, kv in (("float", model, None), ("w4ax", quantized(model), KVQuantConfig())):
    sharded = shard_model(m, make_mesh(8))
    kernel = sharded.layers[0].mlp.up_proj.kernel.get_value()
    data = kernel.data if hasattr(kernel, "data") else kernel
    assert len(data.sharding.device_set) == 8 and data.addressable_shards[0].data.shape[1] == 128 // 8, name
    a, _ = m(tokens)
    b, _ = sharded(tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
    ga = generate(m, [[1, 5, 7], [1]], 10, kv=kv).tokens
    gb = generate(sharded, [[1, 5, 7], [1]], 10, kv=kv).tokens
    assert ga == gb, (name, kv, ga, gb)
  print("SHARDING-OK")
""")


@pytest.mark.slow
def test_tensor_parallel_equals_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
  assert "SHARDING-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_bad_mesh_arguments():
  from cometjax.serving.sharding import make_mesh
  with pytest.raises(ValueError, match="num_devices"):
    make_mesh(10_000)


def test_specs_split_quantized_leaves_along_the_right_axis():
  """The partition specs in-process (the 8-device run above is the slow tier): column-parallel layers split
  the output features of data and scales, row-parallel ones the packed input rows; perms are replicated."""
  import jax
  import numpy as np
  from flax import nnx

  from cometjax.core.formats import ActivationFormat, quantize_weight
  from cometjax.models.llama import LlamaConfig, init_llama
  from cometjax.serving.sharding import _leaf_spec, make_mesh, shard_model
  from jax.sharding import PartitionSpec as P

  config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=False, eos_token_id=None)
  model = init_llama(config, seed=0)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  mlp = pure["layers"][0]["mlp"]
  for name in ("up_proj", "down_proj"):
    w = mlp[name]["kernel"]
    mlp[name]["kernel"] = quantize_weight(w, 4, activation=ActivationFormat(32, 1, w.shape[0] // 32),
                                          perm=np.random.default_rng(0).permutation(w.shape[0]))
  nnx.replace_by_pure_dict(state, pure)
  quantized = nnx.merge(graphdef, state)
  specs = {jax.tree_util.keystr(p): _leaf_spec(p, x, 8, "tp")
           for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(quantized))}
  up = next(k for k in specs if "up_proj" in k and "data" in k)
  down = next(k for k in specs if "down_proj" in k and "data" in k)
  perm = next(k for k in specs if "up_proj" in k and "perm" in k)
  assert specs[up] == P(None, "tp") and specs[down] == P("tp", None) and specs[perm] == P()
  from cometjax.quant.transform import with_weight_layout
  from cometjax.serving.sharding import _specs
  k_major = nnx.state(with_weight_layout(quantized, "nk"))  # data [N, K // 2]: the split axes swap
  leaves = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(_specs(k_major, 8, "tp"))}
  assert leaves[up] == P("tp", None) and leaves[down] == P(None, "tp") and leaves[perm] == P()
  tokens = np.random.default_rng(1).integers(0, 64, (2, 6))
  single = shard_model(quantized, make_mesh(1))  # one device: placement only, same numbers
  np.testing.assert_array_equal(np.asarray(single(tokens)[0]), np.asarray(quantized(tokens)[0]))
