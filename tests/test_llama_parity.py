"""Our Flax Llama family against transformers' PyTorch implementation on tiny random configs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cometjax.checkpoint import load  # noqa: E402
from cometjax.serving.generate import generate  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2)

CONFIGS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=8,
                                                              tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(name, torch model, our loaded model) for one family, saved and re-read through our HF loader."""
  config_cls, model_cls, extra = CONFIGS[request.param]
  torch.manual_seed(0)
  config = getattr(transformers, config_cls)(**COMMON, **extra)
  config._attn_implementation = "eager"
  hf_model = getattr(transformers, model_cls)(config).eval()
  if request.param == "qwen2":  # biases are zero-initialized; make them matter
    with torch.no_grad():
      for layer in hf_model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  directory = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(directory, safe_serialization=True)
  return request.param, hf_model, load(directory)


def test_logits_match_torch(pair):
  name, hf_model, ours = pair
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, COMMON["vocab_size"], size=(2, 24))
  with torch.no_grad():
    expected = hf_model(torch.tensor(tokens)).logits.numpy()
  got, _ = ours.model(tokens)
  diff = np.abs(np.asarray(got) - expected).max()
  assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
  assert np.abs(expected).max() > 0.1, "logits too small for the comparison to mean anything"


def test_greedy_continuation_matches_torch(pair):
  name, hf_model, ours = pair
  prompt = [1, 17, 42, 99, 5, 63]
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
  expected = out[0, len(prompt):].tolist()
  got = generate(ours.model, [prompt], 20, stop_at_eos=False).tokens[0]
  assert got == expected, name
