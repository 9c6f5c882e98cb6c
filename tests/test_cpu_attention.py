"""The CPU attention and cache-write paths equal their plain forms: query chunks (with and without the
causal-prefix key cut) and decode's key-prefix branches against one unchunked softmax, and the decode-step
cache writes (per row, or a whole-layer select) against a scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cometjax.models import llama
from cometjax.serving.kvcache import KVCache


def reference_attention(q, k, v, mask):
  """Unchunked masked softmax; rows with no visible key give 0."""
  b, t, hq, d = q.shape
  k = jnp.repeat(k, hq // k.shape[2], axis=2)
  v = jnp.repeat(v, hq // v.shape[2], axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  scores = jnp.where(mask[:, None], scores, -jnp.inf)
  probs = jnp.where(mask[:, None], jax.nn.softmax(scores, axis=-1), 0.0)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


def random_qkv(seed, b, t, s, hq=4, hkv=2, d=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, hq, d)), jax.random.normal(keys[1], (b, s, hkv, d)),
          jax.random.normal(keys[2], (b, s, hkv, d)))


@pytest.mark.parametrize("causal_prefix", [False, True])
def test_chunked_attention_equals_one_softmax(monkeypatch, causal_prefix):
  monkeypatch.setattr(llama, "SCORE_CHUNK_ELEMENTS", 2 * 4 * 16 * 80)  # chunks of 16 queries over 80 keys
  b, t, s = 2, 70, 80  # a ragged last chunk
  q, k, v = random_qkv(0, b, t, s)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid = jnp.arange(s)[None, :] < jnp.array([[70], [45]])  # row 1: keys 45.. padding
  mask = llama.attention_mask(positions, jnp.broadcast_to(jnp.arange(s), (b, s)), valid, None)
  assert llama.query_chunk(b, 4, t, s) == 16
  got = llama.grouped_query_attention(q, k, v, mask, causal_prefix=causal_prefix)
  np.testing.assert_allclose(got, reference_attention(q, k, v, mask), atol=1e-5)


def test_a_row_with_no_visible_key_gives_zero():
  q, k, v = random_qkv(1, 1, 3, 5)
  mask = jnp.ones((1, 3, 5), bool).at[0, 1].set(False)
  out = llama.grouped_query_attention(q, k, v, mask)
  assert np.all(np.isfinite(out)) and np.all(np.asarray(out[0, 1]) == 0)


def test_causal_prefix_model_call_equals_the_masked_one(monkeypatch):
  monkeypatch.setattr(llama, "SCORE_CHUNK_ELEMENTS", 1)  # chunks of 16 queries
  model = llama.init_llama(llama.TINY_CONFIG, seed=0)
  tokens = jax.random.randint(jax.random.key(2), (2, 40), 0, 512)
  positions = jnp.broadcast_to(jnp.arange(40), (2, 40))
  cut, _ = model(tokens)  # positions None: causal_prefix
  full, _ = model(tokens, positions=positions)  # explicit positions: every chunk reads every key
  np.testing.assert_allclose(cut, full, atol=1e-5)


@pytest.mark.parametrize("newest", [[0, 5], [63, 64], [64, 200], [255, 3]])
def test_decode_attention_reads_a_prefix_and_equals_the_full_softmax(newest):
  # rows at different positions: the branch is picked by the newest one, older rows stay masked
  q, k, v = random_qkv(4, 2, 1, 256)
  positions = jnp.array(newest)[:, None]
  mask = jnp.arange(256)[None, None, :] <= positions[:, :, None]
  assert llama.decode_prefix_lengths(256) == (64, 128, 256)
  read = lambda n: (k[:, :n], v[:, :n])
  got = jax.jit(lambda q, mask, visible: llama.decode_attention(q, read, mask, visible))(q, mask, jnp.max(positions) + 1)
  np.testing.assert_allclose(got, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_row_writes", [0, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_write_equals_scatter(batch, max_row_writes, monkeypatch):
  monkeypatch.setattr("cometjax.core.kv.MAX_ROW_WRITES", max_row_writes)
  shape = (batch, 8, 2, 4)
  stack = jax.random.normal(jax.random.key(0), (2, *shape))
  cache = KVCache(tuple(stack), tuple(jax.random.normal(jax.random.key(1), (2, *shape))))
  new = jax.random.normal(jax.random.key(3), (batch, 1, 2, 4))
  positions = jnp.array([[5], [8], [0]])[:batch]  # 8 = max_len: dropped
  updated, keys, _ = cache.update(1, new, new, positions)
  rows = jnp.arange(batch)[:, None]
  want = stack[1].at[rows, positions].set(new, mode="drop")
  np.testing.assert_array_equal(updated.k[1], want)
  np.testing.assert_array_equal(keys, want)
  np.testing.assert_array_equal(updated.k[0], stack[0])


def test_decode_step_write_out_of_range_keeps_the_single_row_cache():
  cache = KVCache((jnp.ones((1, 4, 1, 2)),), (jnp.ones((1, 4, 1, 2)),))
  updated, _, _ = cache.update(0, jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)), jnp.array([[4]]))
  np.testing.assert_array_equal(updated.k[0], cache.k[0])
