"""Paged KV4 decode attention (interpret mode on CPU) against its jnp reference and `PagedKV4.read_*`.

The caches are random pools (codes, scales, zeros, k_recent all garbage-filled), scattered page tables
with unallocated (-1) entries past each row's length and spare pages nobody owns, so a kernel that reads
the wrong page, slot, scale or open group shows up as a mismatch. Interpret mode fills outputs with NaN
before the kernel runs (see test_pallas_kernels.py), so an unwritten partial shows up as NaN.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cometjax import ops
from cometjax.core.kv import PagedKV4
from cometjax.core.kv_config import KVQuantConfig
from cometjax.errors import UnsupportedError
from cometjax.models.llama import TINY_CONFIG, grouped_query_attention, init_llama, set_matmul_implementation
from cometjax.pallas.paged_kv4_attention import kernel_supported, paged_kv4_attention, paged_kv4_attention_reference
from cometjax.serving.generate import generate
from cometjax.serving.kvcache import KV4Cache
from kernel_cases import MODES, interpreted, lowered_for_cuda


def random_cache(mode, lengths, *, max_len=32, page=8, kv_heads=2, head_dim=16, head_group=None,
                 spare_pages=3, seed=0) -> PagedKV4:
  """One layer of a paged INT4 cache with random pool contents; row b owns random pages covering lengths[b]
  tokens."""
  rng = np.random.default_rng(seed)
  batch, n = len(lengths), max_len // page
  num_pages = batch * n + spare_pages
  config = KVQuantConfig(k_mode=mode, group_tokens=page, head_group=head_group)
  layer = KV4Cache.create(1, batch, max_len, kv_heads, head_dim, config=config,
                          page_size=None if mode == "channel" else page, num_pages=num_pages).paged_layer(0)
  table = rng.permutation(num_pages)[:batch * n].reshape(batch, n).astype(np.int32)
  needed = -(-np.asarray(lengths) // page)
  table = np.where(np.arange(n)[None, :] < needed[:, None], table, -1)
  codes = lambda x: jnp.asarray(rng.integers(0, 256, x.shape), jnp.uint8)
  scales = lambda x: jnp.asarray(rng.uniform(0.05, 0.4, x.shape), jnp.float32)
  zeros = lambda x: jnp.asarray(rng.uniform(0.0, 15.0, x.shape), jnp.float32)
  return dataclasses.replace(
      layer, k=codes(layer.k), v=codes(layer.v), k_scale=scales(layer.k_scale), k_zero=zeros(layer.k_zero),
      v_scale=scales(layer.v_scale), v_zero=zeros(layer.v_zero),
      k_recent=jnp.asarray(rng.normal(size=layer.k_recent.shape), jnp.float32),
      length=jnp.asarray(lengths, jnp.int32), page_table=jnp.asarray(table))


def random_q(cache, group_heads, seed=1, dtype=jnp.float32):
  batch, kv_heads, head_dim = cache.page_table.shape[0], cache.k.shape[2], cache.head_dim
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, kv_heads * group_heads, head_dim)), dtype)


# page 8: 0 = empty, 1, 5 inside the open group, 8 / 24 exactly at a group boundary, 19 inside, 32 = full
LENGTHS = (0, 1, 5, 8, 19, 24, 32)


@pytest.mark.parametrize("mode", ["token", "hadamard", "channel"])
def test_reference_equals_attention_over_read_keys(mode):
  cache = random_cache(mode, LENGTHS, head_group=8 if mode != "channel" else None)
  q = random_q(cache, group_heads=4)
  keys, values = cache.read_keys(), cache.read_values()
  positions = jnp.arange(cache.max_len)
  mask = (positions[None, :] < jnp.asarray(LENGTHS)[:, None])[:, None, :]  # [B, 1, S]
  want = grouped_query_attention(q[:, None], keys, values, mask)[:, 0]
  np.testing.assert_allclose(paged_kv4_attention_reference(q, cache), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("execution", MODES)
@pytest.mark.parametrize("mode,head_dim,group_heads,head_group,max_len,tuning", [
    ("token", 64, 4, 32, 40, dict(pages_per_block=2, num_splits=2)),  # 5 pages: a ragged last split
    ("hadamard", 16, 1, None, 32, dict(pages_per_block=1, num_splits=3)),
    ("channel", 8, 4, None, 32, dict(pages_per_block=2, num_splits=2)),
    ("channel", 64, 1, 16, 40, dict()),  # V in head groups of 16; default tuning (one split of 5 pages)
    ("channel", 64, 4, None, 64, dict(num_splits=2)),
    ("hadamard", 64, 2, 32, 64, dict(num_splits=2)),
])
def test_kernel_matches_reference(mode, head_dim, group_heads, head_group, max_len, tuning, execution):
  lengths = LENGTHS + ((40, 33) if max_len == 40 else ())
  cache = random_cache(mode, lengths, max_len=max_len, head_dim=head_dim, head_group=head_group, seed=head_dim)
  if not interpreted(execution) and not kernel_supported(cache):
    pytest.skip("the compiled kernel needs power-of-two page and head sizes and head groups of >= 32 channels")
  q = random_q(cache, group_heads)
  got = paged_kv4_attention(q, cache, interpret=interpreted(execution), **tuning)
  assert not np.any(np.isnan(got)), "an unwritten partial (interpret mode poisons outputs with NaN)"
  np.testing.assert_allclose(got, paged_kv4_attention_reference(q, cache), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(got[0], 0.0)  # length 0: no key, zeros


@pytest.mark.parametrize("execution", MODES)
def test_explicit_lengths_and_bf16(execution):
  cache = random_cache("channel", (32, 32, 32), head_dim=16 if interpreted(execution) else 64)
  lengths = jnp.array([3, 16, 29], jnp.int32)  # the open group follows lengths, not cache.length
  q = random_q(cache, 2, dtype=jnp.bfloat16)
  got = paged_kv4_attention(q, cache, lengths, interpret=interpreted(execution), num_splits=2)
  assert got.dtype == jnp.bfloat16
  want = paged_kv4_attention_reference(q, cache, lengths)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(mode=st.sampled_from(["token", "hadamard", "channel"]), pages=st.integers(1, 5),
       page=st.sampled_from([2, 4, 8]), batch=st.integers(1, 3), kv_heads=st.integers(1, 2),
       group_heads=st.sampled_from([1, 2, 3]), num_splits=st.integers(1, 4), seed=st.integers(0, 99))
def test_paged_kv4_attention_fuzz(mode, pages, page, batch, kv_heads, group_heads, num_splits, seed):
  max_len = pages * page
  lengths = tuple(np.random.default_rng(seed).integers(0, max_len + 1, batch))
  cache = random_cache(mode, lengths, max_len=max_len, page=page, kv_heads=kv_heads, head_dim=8, seed=seed)
  q = random_q(cache, group_heads, seed=seed)
  got = paged_kv4_attention(q, cache, interpret=True, num_splits=num_splits, pages_per_block=1)
  np.testing.assert_allclose(got, paged_kv4_attention_reference(q, cache), rtol=2e-5, atol=2e-5)


def test_attention_paged_kv4_dispatch():
  cache = random_cache("token", LENGTHS, head_dim=8)
  q = random_q(cache, 2)
  want = ops.attention_paged_kv4(q, cache, implementation="xla")
  np.testing.assert_allclose(ops.attention_paged_kv4(q, cache, implementation="interpret"), want,
                             rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(ops.attention_paged_kv4(q, cache, implementation="auto"), want)  # CPU: XLA
  assert not kernel_supported(cache)  # head_dim 8: the compiled kernel cannot tile it, so asking for it fails
  with pytest.raises(UnsupportedError, match="attention_paged_kv4: implementation='pallas' cannot serve.*head_dim=8"):
    ops.attention_paged_kv4(q, cache, implementation="pallas")


def test_write_is_update_without_the_read():
  cache = KV4Cache.create(2, 2, 16, 2, 8, config=KVQuantConfig(group_tokens=8))
  rng = np.random.default_rng(0)
  k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 8)), jnp.float32) for _ in range(2))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  updated, _, _ = jax.jit(lambda c: c.update(1, k, v, positions))(cache)
  written = jax.jit(lambda c: c.write(1, k, v, positions))(cache)
  jax.tree.map(np.testing.assert_array_equal, written, updated)


def test_errors():
  cache = random_cache("token", (4, 9), head_dim=8)
  q = random_q(cache, 2)
  with pytest.raises(ValueError, match="q must be"):
    paged_kv4_attention(q[:, None], cache, interpret=True)
  with pytest.raises(ValueError, match="q must be"):
    paged_kv4_attention(q[:1], cache, interpret=True)
  with pytest.raises(ValueError, match="q must be"):
    paged_kv4_attention(q[..., :4], cache, interpret=True)
  with pytest.raises(ValueError, match="q's heads"):
    paged_kv4_attention(q[:, :3], cache, interpret=True)
  with pytest.raises(ValueError, match="lengths"):
    paged_kv4_attention(q, cache, jnp.array([3]), interpret=True)
  with pytest.raises(ValueError, match="kv must be a PagedKV4"):
    paged_kv4_attention_reference(q, (cache.k, cache.v))
  with pytest.raises(ValueError, match="block_h"):
    paged_kv4_attention(q, cache, block_h=3, interpret=True)
  with pytest.raises(ValueError, match="num_splits"):
    paged_kv4_attention(q, cache, num_splits=0, interpret=True)
  with pytest.raises(ValueError, match="compiled kernel"):
    paged_kv4_attention(q, cache)  # head_dim 8 cannot be tiled for Triton


@pytest.mark.parametrize("mode", ["token", "channel"])
def test_lowers_to_triton(mode):
  """Exporting for CUDA runs the Pallas -> Triton lowering (no GPU needed); Triton's own compile and the
  numbers on a GPU are not checked here."""
  spec = jax.ShapeDtypeStruct
  cache = jax.eval_shape(lambda: KV4Cache.create(2, 4, 256, 2, 128, dtype=jnp.bfloat16, num_pages=40,
                                                 config=KVQuantConfig(k_mode=mode, group_tokens=32)).paged_layer(1))
  module = lowered_for_cuda(lambda q, cache: paged_kv4_attention(q, cache), spec((4, 8, 128), jnp.bfloat16), cache)
  assert module.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.slow
def test_llama_decode_with_kernel_matches_xla():
  """Greedy generation over a KV4 cache (default channel mode): Attention's kernel path ("interpret")
  gives the tokens of the dequantize-the-layer path ("xla")."""
  model = init_llama(TINY_CONFIG.replace(num_layers=2), seed=3)
  kv = KVQuantConfig(group_tokens=16)
  prompts = [[1, 5, 9, 13, 2, 7, 30, 40, 41, 42, 43, 44, 45], [1, 3]]  # decode crosses a group boundary
  tokens = {}
  for implementation in ("xla", "interpret"):
    set_matmul_implementation(model, implementation)
    tokens[implementation] = generate(model, prompts, 8, stop_at_eos=False, kv=kv).tokens
  assert tokens["interpret"] == tokens["xla"]
