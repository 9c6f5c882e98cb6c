"""A quantized Llama runs through every matmul implementation with the same outputs."""

import numpy as np
import pytest
from flax import nnx

from cometjax.core.formats import ActivationFormat, is_quantized_leaf, quantize_weight
from cometjax.models.llama import LlamaConfig, init_llama, set_matmul_implementation
from cometjax.serving.generate import generate

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                     tie_word_embeddings=False, eos_token_id=None)


def w4ax_model(seed=0):
  """Every projection W4 with a mixed activation plan: 16-channel blocks, the first one INT8."""
  model = init_llama(CONFIG, seed=seed)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  for block in ("self_attn", "mlp"):
    for proj in pure["layers"][0][block].values():
      w = np.asarray(proj["kernel"])
      fmt = ActivationFormat(16, 1, w.shape[0] // 16)
      proj["kernel"] = quantize_weight(w, 4, activation=fmt, perm=rng.permutation(w.shape[0]))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def test_every_projection_is_quantized():
  model = w4ax_model()
  layer = model.layers[0]
  projections = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                 layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
  assert all(is_quantized_leaf(p.kernel.get_value()) for p in projections)
  assert not is_quantized_leaf(model.lm_head.kernel.get_value())  # the head stays float


@pytest.mark.slow
def test_xla_and_interpret_paths_agree():
  tokens = np.random.default_rng(1).integers(0, 64, (2, 8))
  outputs = {}
  for implementation in ("xla", "interpret"):
    model = set_matmul_implementation(w4ax_model(), implementation)
    outputs[implementation] = np.asarray(model(tokens)[0])
  np.testing.assert_allclose(outputs["xla"], outputs["interpret"], atol=1e-5, rtol=1e-5)
  greedy = {impl: generate(set_matmul_implementation(w4ax_model(), impl), [[1, 2, 3]], 5).tokens
            for impl in ("xla", "interpret")}
  assert greedy["xla"] == greedy["interpret"]


def test_bad_implementation_is_named():
  with pytest.raises(ValueError, match="implementation must be one of"):
    set_matmul_implementation(init_llama(CONFIG), "cuda")
