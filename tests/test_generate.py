import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.serving.generate import (TRACE_COUNTS, SamplingConfig, bucket, filter_logits, filter_logits_rows,
                                       generate, sample_logits, sample_logits_rows)

CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=5)


@pytest.fixture(scope="module")
def model():
  return init_llama(CONFIG, seed=1)


def reference_greedy(model, prompt, n):
  """Greedy decoding by re-running the full sequence each step (no cache), one fixed-shape compiled
  forward: the sequence is right-padded to its final length, and causal attention ignores the padding."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
  ids = np.zeros((1, len(prompt) + n), np.int32)
  ids[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    ids[0, t] = int(np.argmax(forward(state, ids)[0, t - 1]))
  return ids[0, len(prompt):].tolist()


def test_cached_decode_equals_full_recompute(model):
  prompt = [1, 7, 9, 11]
  got = generate(model, [prompt], 12, stop_at_eos=False).tokens[0]
  assert got == reference_greedy(model, prompt, 12)


def test_batch_of_different_lengths_equals_one_by_one(model):
  prompts = [[1], [1, 4, 8, 15, 16, 23, 42], [1, 3, 3]]
  batched = generate(model, prompts, 10, stop_at_eos=False).tokens
  assert batched == [generate(model, [p], 10, stop_at_eos=False).tokens[0] for p in prompts]


def test_one_compilation_per_shape_bucket(model):
  generate(model, [[1, 2, 3]], 8)  # warm this bucket (prompt 16, cache 32)
  before = dict(TRACE_COUNTS)
  for prompt, n in [([1, 2], 5), ([1] * 9, 12), ([4, 4, 4, 4], 16)]:
    generate(model, [prompt], n, stop_at_eos=False)
  assert TRACE_COUNTS == before, "a new prompt or max_new_tokens in the same bucket recompiled"
  generate(model, [[1] * 20], 8)  # a longer prompt: a new bucket, one more compilation each
  assert TRACE_COUNTS == {k: v + 1 for k, v in before.items()}


def test_stops_at_eos_per_row():
  config = CONFIG.replace(eos_token_id=None)
  model = init_llama(config, seed=3)
  free = generate(model, [[1, 2], [1, 9, 9]], 16, stop_at_eos=False).tokens
  eos = free[0][3]  # make the 4th token of row 0 the EOS: row 0 stops there, row 1 continues unless it emits it
  stopped = generate(model, [[1, 2], [1, 9, 9]], 16, eos_ids=[eos]).tokens
  assert stopped[0] == free[0][:4]
  cut = free[1].index(eos) + 1 if eos in free[1] else 16
  assert stopped[1] == free[1][:cut]


def test_sampling_is_reproducible_and_key_dependent(model):
  sampling = SamplingConfig(temperature=1.0, top_k=10, top_p=0.9)
  a = generate(model, [[1, 2]], 20, sampling=sampling, key=jax.random.key(0), stop_at_eos=False).tokens
  b = generate(model, [[1, 2]], 20, sampling=sampling, key=jax.random.key(0), stop_at_eos=False).tokens
  c = generate(model, [[1, 2]], 20, sampling=sampling, key=jax.random.key(1), stop_at_eos=False).tokens
  assert a == b and a != c


def test_top_k_and_top_p_filters():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda s: {int(sample_logits(logits, k, s)[0]) for k in keys}
  assert draw(SamplingConfig(temperature=1.0, top_k=2)) == {0, 1}
  assert draw(SamplingConfig(temperature=1.0, top_p=0.6)) == {0, 1}  # 0.5 < 0.6, so 0.3 joins
  assert draw(SamplingConfig(temperature=1.0, top_p=0.4)) == {0}
  assert draw(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3}
  assert draw(SamplingConfig()) == {0}


def test_timings_are_reported(model):
  result = generate(model, [[1, 2, 3]], 6, stop_at_eos=False)
  assert result.generated_tokens == 6 and result.prompt_tokens == 3
  assert result.prefill_s > 0 and result.decode_s > 0 and result.decode_tokens_per_s > 0


def test_compiling_call_is_flagged_and_warmup_keeps_it_out_of_the_timings(model):
  prompt = [1] * 40  # prompt bucket 64, cache 128: used by no other test here
  cold = generate(model, [prompt], 7, stop_at_eos=False)
  assert cold.compiled and cold.warmup_s is None
  warm = generate(model, [prompt], 7, stop_at_eos=False, warmup=True)
  assert not warm.compiled and warm.warmup_s > 0 and warm.tokens == cold.tokens
  assert warm.timings()["compiled"] is False


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]], max_new_tokens=3), "non-empty"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1, 500]], max_new_tokens=2), "vocab_size"),
    (dict(prompts=[[1]], max_new_tokens=2, sampling=SamplingConfig(temperature=0.7)), "key"),
])
def test_bad_arguments_raise(model, kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate(model, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p")])
def test_bad_sampling_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**kwargs)


def test_bucket():
  assert [bucket(n) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]


@pytest.mark.parametrize("setting", [dict(temperature=0.7), dict(temperature=1.3, top_k=3),
                                     dict(temperature=1.0, top_p=0.8), dict(temperature=0.5, top_k=5, top_p=0.6),
                                     dict(temperature=1.0, top_k=64)])
def test_per_row_filter_equals_the_config_filter(setting):
  logits = jax.random.normal(jax.random.key(3), (4, 40)) * 3
  config = SamplingConfig(**setting)
  rows = lambda value: jnp.full((4,), value)
  per_row = filter_logits_rows(logits, rows(config.temperature), rows(config.top_k).astype(jnp.int32),
                               rows(config.top_p))
  np.testing.assert_allclose(per_row, filter_logits(logits, config), rtol=1e-6)


def test_per_row_sampling_mixes_greedy_and_sampled_rows():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2, jnp.float32))
  keys = jax.random.split(jax.random.key(0), 200)
  temperature, top_k, top_p = jnp.array([0.0, 1.0]), jnp.array([0, 2], jnp.int32), jnp.array([1.0, 1.0])
  drawn = np.asarray(jax.vmap(lambda k: sample_logits_rows(logits, jax.random.split(k, 2), temperature, top_k,
                                                            top_p))(keys))  # [200, 2]
  assert set(drawn[:, 0]) == {0} and set(drawn[:, 1]) == {0, 1}
