"""INT4 KV caches: error bounds, decode == chunked prefill, generate/perplexity integration."""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cometjax.core.kv_config import KVQuantConfig
from cometjax.core.rotations import hadamard_orthonormal as hadamard_matrix
from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.serving.generate import generate
from cometjax.serving.kvcache import HeldKV4Cache, KV4Cache, KVCache, create_cache

from conftest import require_data

L, B, S, H, D = 2, 2, 64, 2, 8
MODES = ("token", "hadamard", "channel")


def random_kv(t, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.normal(0, 1, (B, t, H, D)).astype(np.float32)
  k[..., 3] *= 8  # an outlier channel, as real keys have
  return jnp.asarray(k), jnp.asarray(rng.normal(0, 1, (B, t, H, D)).astype(np.float32))


def fill(cache, layer, k, v, chunk):
  """Writes k, v [B, T, H, D] at positions 0..T-1 in chunks; returns the cache and the last read."""
  t = k.shape[1]
  for start in range(0, t, chunk):
    pos = jnp.broadcast_to(jnp.arange(start, min(start + chunk, t)), (B, min(chunk, t - start)))
    cache, keys, values = cache.update(layer, k[:, start:start + chunk], v[:, start:start + chunk], pos)
  return cache, keys, values


@pytest.mark.parametrize("mode", MODES)
def test_quantization_error_is_bounded(mode):
  k, v = random_kv(S)
  cache = KV4Cache.create(L, B, S, H, D, config=KVQuantConfig(k_mode=mode, group_tokens=16))
  _, keys, values = fill(cache, 1, k, v, chunk=16)
  v_step = (v.max(-1, keepdims=True) - v.min(-1, keepdims=True)) / 15  # per token per head scale
  assert np.all(np.abs(values - v) <= v_step / 2 + 1e-5)
  if mode == "channel":  # per channel over groups of 16 tokens; the newest group is exact
    groups = k.reshape(B, S // 16, 16, H, D)
    k_step = jnp.repeat((groups.max(2) - groups.min(2)) / 15, 16, axis=1)
    assert np.all(np.abs(keys - k) <= k_step / 2 + 1e-5)
    np.testing.assert_array_equal(keys[:, -16:], k[:, -16:])
    assert np.abs(keys[:, :-16] - k[:, :-16]).max() > 0
  else:
    err = np.abs(keys - k).max()
    assert 0 < err < float(np.abs(k).max()) / 4
  assert all(np.all(np.asarray(layer.k_scale) == 1) for layer in cache.layers)  # caches are values


def test_hadamard_is_orthonormal():
  h = hadamard_matrix(16)
  np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-6)
  with pytest.raises(ValueError, match="no Hadamard matrix of order 6"):
    hadamard_matrix(6)


@pytest.mark.parametrize("mode", MODES)
def test_decode_token_by_token_equals_chunked_prefill(mode):
  k, v = random_kv(40, seed=1)
  config = KVQuantConfig(k_mode=mode, group_tokens=8)
  chunked, keys_a, values_a = fill(KV4Cache.create(L, B, S, H, D, config=config), 0, k, v, chunk=8)
  stepped, keys_b, values_b = fill(KV4Cache.create(L, B, S, H, D, config=config), 0, k, v, chunk=1)
  np.testing.assert_array_equal(keys_a, keys_b)
  np.testing.assert_array_equal(values_a, values_b)
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(stepped)):
    np.testing.assert_array_equal(a, b)


def test_padding_positions_are_dropped():
  k, v = random_kv(8)
  for cache in (KVCache.create(L, B, S, H, D), KV4Cache.create(L, B, S, H, D)):
    before = cache.v[0] if isinstance(cache, KVCache) else cache.read_values(0)
    pos = jnp.array([[0, 1, 2, 3, S, S, S, S], list(range(8))])
    _, _, after = cache.update(0, k, v, pos)
    np.testing.assert_array_equal(after[0, 4:], before[0, 4:])
    assert np.abs(np.asarray(after[1, 4:8] - before[1, 4:8])).max() > 0


@pytest.mark.parametrize("mode", MODES)
def test_paged_cache_equals_contiguous(mode):
  """Rows own scattered pages of a pool smaller than batch * pages per row; reads are unchanged."""
  k, v = random_kv(40, seed=3)
  config = KVQuantConfig(k_mode=mode, group_tokens=8)
  contiguous = KV4Cache.create(L, B, S, H, D, config=config, page_size=8)
  pages_per_row = S // 8
  paged = KV4Cache.create(L, B, S, H, D, config=config, page_size=8, num_pages=11)
  table = -np.ones((B, pages_per_row), np.int32)
  table[0, :5] = [7, 2, 9, 0, 4]  # 40 tokens need 5 pages per row
  table[1, :5] = [1, 10, 3, 8, 6]
  paged = paged.with_page_table(table)
  _, keys_a, values_a = fill(contiguous, 1, k, v, chunk=8)
  _, keys_b, values_b = fill(paged, 1, k, v, chunk=8)
  np.testing.assert_array_equal(keys_a[:, :40], keys_b[:, :40])
  np.testing.assert_array_equal(values_a[:, :40], values_b[:, :40])
  assert paged.nbytes_per_token() == contiguous.nbytes_per_token()
  assert paged.num_pages == 11 < contiguous.num_pages == B * pages_per_row


def test_page_table_shape_is_checked():
  with pytest.raises(ValueError, match="page_table must have shape"):
    KV4Cache.create(L, B, S, H, D).with_page_table(np.zeros((B, 3), np.int32))


def test_memory_per_token():
  cache = KV4Cache.create(L, 1, S, H, D, config=KVQuantConfig(k_mode="token"))
  fp16 = L * 2 * H * D * 2
  assert cache.nbytes_per_token() < fp16  # codes 0.5 B/value plus f32 scale/zero per token-head


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_mode="per-head"), "k_mode"), (dict(group_tokens=0), "group_tokens")])
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    KVQuantConfig(**kwargs)


def test_bad_shapes():
  with pytest.raises(ValueError, match="head_group"):
    KV4Cache.create(L, B, S, H, D, config=KVQuantConfig(k_mode="token", head_group=3))
  with pytest.raises(ValueError, match="needs a Hadamard matrix of order head_dim=6"):
    KV4Cache.create(L, B, S, H, 6, config=KVQuantConfig(k_mode="hadamard"))
  with pytest.raises(ValueError, match="multiple of group_tokens"):
    KV4Cache.create(L, B, 40, H, D, config=KVQuantConfig(group_tokens=32))
  with pytest.raises(ValueError, match="page_size must equal group_tokens"):
    KV4Cache.create(L, B, S, H, D, config=KVQuantConfig(group_tokens=32), page_size=16)
  with pytest.raises(ValueError, match="paging options"):
    create_cache(None, CONFIG, 1, 32, num_pages=4)
  cache = KV4Cache.create(L, B, S, H, D, config=KVQuantConfig(group_tokens=8))
  k, v = random_kv(16)
  with pytest.raises(ValueError, match="at most group_tokens=8"):
    cache.update(0, k, v, jnp.broadcast_to(jnp.arange(16), (B, 16)))


CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256, tie_word_embeddings=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_generate_with_kv4_batches_rows_independently(mode):
  model = init_llama(CONFIG, seed=2)
  kv = KVQuantConfig(k_mode=mode, group_tokens=16)
  prompts = [[1], [1, 4, 8, 15, 16, 23, 42, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3], [1, 3, 3]]
  batched = generate(model, prompts, 20, stop_at_eos=False, kv=kv).tokens
  assert batched == [generate(model, [p], 20, stop_at_eos=False, kv=kv).tokens[0] for p in prompts]


def test_create_cache_dispatch():
  assert isinstance(create_cache(None, CONFIG, 1, 32), KVCache)
  cache = create_cache(KVQuantConfig(), CONFIG, 1, 32)
  assert isinstance(cache, KV4Cache) and cache.layers[0].k.dtype == jnp.uint8 and cache.prefill_chunk == 32


@pytest.mark.slow
@pytest.mark.realdata
def test_kv4_on_stories260k():
  from cometjax.checkpoint import load
  from cometjax.serving.perplexity import perplexity

  loaded = load(require_data("llama", "stories260K", "hf"))
  text = require_data("text", "tinystories_val.txt").read_text(encoding="utf-8")
  kw = dict(max_documents=40, batch_size=16, progress=False)
  fp = perplexity(loaded.model, loaded.tokenizer, text, **kw).ppl
  channel = perplexity(loaded.model, loaded.tokenizer, text, kv=KVQuantConfig(), **kw).ppl
  token = perplexity(loaded.model, loaded.tokenizer, text, kv=KVQuantConfig(k_mode="token"), **kw).ppl
  assert channel < fp * 1.02, (fp, channel)  # the default layout costs little
  assert token > fp * 1.2, (fp, token)  # per-token K breaks on this model's outlier key channels
  tokens = generate(loaded.model, [[1]], 32, stop_at_eos=False, kv=KVQuantConfig()).tokens[0]
  assert tokens[:20] == [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396,
                         267, 337]


def test_no_pool_array_of_the_largest_e2e_case_passes_2_to_the_31_bytes():
  """bench/e2e.py's largest case, Llama-2-7B at batch 256 with 128 + 128 tokens (a 256-token cache bucket), in
  one [layers, pages, ...] array would be exactly 2**32 bytes of K codes; Pallas-Triton indexes arrays under
  2**32 bytes with 32-bit offsets, so offsets past 2**31 would wrap. One pool per layer keeps each far below."""
  cache = jax.eval_shape(lambda: KV4Cache.create(32, 256, 256, 32, 128, dtype=jnp.bfloat16, config=KVQuantConfig()))
  arrays = jax.tree.leaves(cache)
  largest = max(a.size * a.dtype.itemsize for a in arrays)
  assert largest < 2**31 // 8, largest  # 2**27 bytes: the K (or V) codes of one layer
  assert sum(a.size * a.dtype.itemsize for a in cache.layers[0].__dict__.values() if hasattr(a, "dtype")) < 2**31
  assert 32 * largest == 2**32  # what a single [layers, ...] K pool would have held


@pytest.mark.parametrize("mode", MODES)
def test_contiguous_reads_equal_reads_through_the_table(mode):
  config = KVQuantConfig(k_mode=mode, group_tokens=16)
  k, v = random_kv(40)
  caches = [fill(KV4Cache.create(L, B, S, H, D, config=config, contiguous=c), 1, k, v, 8)[0] for c in (False, True)]
  assert caches[1].layers[1].contiguous and not caches[0].layers[1].contiguous
  for n in (16, 48, S):
    for a, b in zip(caches[0].read(1, n), caches[1].read(1, n)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="contiguous=True needs num_pages"):
    KV4Cache.create(L, B, S, H, D, config=config, num_pages=3, contiguous=True)


@pytest.mark.parametrize("mode", MODES)
def test_held_copy_reads_what_the_int4_cache_reads(mode):
  # rows at different positions decode across group boundaries; every step the float copy's visible keys and
  # values equal the INT4 cache's (channel mode: a group exact while open, dequantized the step after it closes)
  config = KVQuantConfig(k_mode=mode, group_tokens=8)
  cache = KV4Cache.create(L, B, S, H, D, config=config, page_size=8, contiguous=True)
  k, v = random_kv(40, seed=3)
  prompt = 16  # prefill two groups, then decode; row 1 runs 5 positions ahead
  cache, _, _ = fill(cache, 0, k[:, :prompt], v[:, :prompt], 8)
  held = HeldKV4Cache.hold(cache)
  write = jax.jit(lambda c, k, v, pos: c.write(0, k, v, pos))
  for step in range(prompt, 34):
    positions = jnp.array([[step], [step + 5]])
    rows = jnp.arange(B)[:, None]
    k_new, v_new = k[rows, positions - 5 * rows], v[rows, positions - 5 * rows]
    cache, held = write(cache, k_new, v_new, positions), write(held, k_new, v_new, positions)
    want_k, want_v = cache.read(0, S)
    got_k, got_v = held.read(0, S)
    # row 1 skipped positions 16..20: that group's first rows were never written, in neither
    seen = [np.r_[0:int(positions[0, 0]) + 1], np.r_[0:prompt, 21:int(positions[1, 0]) + 1]]
    # hadamard keys go through the inverse rotation inside a different fusion: float32 rounding apart
    exact = np.testing.assert_array_equal if mode != "hadamard" else functools.partial(
        np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    for row in range(B):
      exact(got_k[row, seen[row]], want_k[row, seen[row]], err_msg=f"keys, step {step}")
      np.testing.assert_array_equal(got_v[row, seen[row]], want_v[row, seen[row]], err_msg=f"values, step {step}")


def test_generate_through_the_held_copy_gives_the_same_tokens():
  model = init_llama(CONFIG, seed=4)
  kv = KVQuantConfig(k_mode="channel", group_tokens=16)
  prompts = [[1, 5, 9], [1, 4, 8, 15, 16, 23, 42, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3]]
  held = generate(model, prompts, 40, stop_at_eos=False, kv=kv, dequantize_cache=True).tokens
  assert held == generate(model, prompts, 40, stop_at_eos=False, kv=kv, dequantize_cache=False).tokens
