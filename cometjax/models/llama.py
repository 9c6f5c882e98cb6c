"""Flax NNX Llama family: Llama-2, Llama-3/3.1 (llama3 RoPE scaling), Mistral, Qwen2.

Every projection goes through `cometjax.ops.linear`, so a weight leaf may be a float array
`[in, out]` or a quantized-weight pytree and this file never changes for quantization.

Attention reads and writes a KV cache object, passed in and returned (`cometjax.serving.kvcache` has the
float and the paged INT4 ones). The model needs only this of a cache:
  update(layer, k, v, positions) -> (cache, keys [B, S, Hkv, D], values [B, S, Hkv, D])
                                     writes the new keys/values (positions >= max_len are dropped) and
                                     returns the whole layer as attention sees it;
  write(layer, k, v, positions) -> cache  the same without the read;
  paged_layer(layer) -> cometjax.core.kv.PagedKV4 | None  the layer as the paged decode kernel reads it;
  max_len, prefill_chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cometjax import ops
from cometjax.core.formats import (InputTransformWeight, QuantizedEmbedding, QuantizedWeight, dequantized_leaf,
                                   is_held, reads_the_same_input, with_input_arrays_of, with_joint_weight)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling as in Hugging Face `rope_parameters` ("linear" or "llama3")."""
  rope_type: str
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3 only

  def __post_init__(self):
    if self.rope_type not in ("linear", "llama3"):
      raise ValueError(f"rope_type must be 'linear' or 'llama3', got {self.rope_type!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None  # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2, Llama attention_bias
  o_bias: bool = False  # Llama attention_bias
  mlp_bias: bool = False
  sliding_window: int | None = None  # Mistral: a key is visible iff query_pos - key_pos < window
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  model_type: str = "llama"
  dtype: Any = jnp.float32  # parameter and activation dtype; norms, RoPE and softmax run in float32

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                       "when head_dim is not given")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
  """[head_dim // 2] float32 inverse frequencies, with the config's scaling applied."""
  dim = config.resolved_head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.rope_type == "linear":
    return inv_freq / scaling.factor
  # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
  low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (Hugging Face layout).  x: [B, T, H, D]; positions: [B, T]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) through `ops.linear`; kernel is [in, out] (float or quantized leaf)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
    self.implementation = "auto"  # backend for quantized kernels; see set_matmul_implementation

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias.get_value()
    return ops.linear(x, self.kernel.get_value(), bias, implementation=self.implementation)


def project(x: jax.Array, *layers: Linear) -> list[jax.Array]:
  """The layers applied to one input x (`ops.linears`: an input quantized alike for all is quantized once)."""
  return ops.linears(x, [layer.kernel.get_value() for layer in layers],
                     [None if layer.bias is None else layer.bias.get_value() for layer in layers],
                     implementations=[layer.implementation for layer in layers])


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight.get_value() * normed.astype(x.dtype)


def attention_mask(query_positions: jax.Array, key_positions: jax.Array, key_valid: jax.Array | None,
                   sliding_window: int | None) -> jax.Array:
  """[B, T, S] bool: causal (key_pos <= query_pos), optional sliding window and key validity."""
  q = query_positions[:, :, None]
  k = key_positions[:, None, :]
  mask = k <= q
  if sliding_window is not None:
    mask &= (q - k) < sliding_window
  if key_valid is not None:
    mask &= key_valid[:, None, :]
  return mask


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, layer_index: int, *, rngs: nnx.Rngs):
    dim, hd = config.hidden_size, config.resolved_head_dim
    self.config = config
    self.layer_index = layer_index
    self.q_proj = Linear(dim, config.num_heads * hd, use_bias=config.qkv_bias, dtype=config.dtype, rngs=rngs)
    self.k_proj = Linear(dim, config.num_kv_heads * hd, use_bias=config.qkv_bias, dtype=config.dtype, rngs=rngs)
    self.v_proj = Linear(dim, config.num_kv_heads * hd, use_bias=config.qkv_bias, dtype=config.dtype, rngs=rngs)
    self.o_proj = Linear(config.num_heads * hd, dim, use_bias=config.o_bias, dtype=config.dtype, rngs=rngs)
    self.implementation = "auto"  # backend of INT4-cache decode attention; see set_matmul_implementation

  def __call__(self, x, positions, inv_freq, cache, key_valid, causal_prefix=False):
    cfg = self.config
    b, t, _ = x.shape
    hd = cfg.resolved_head_dim
    q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
    q = apply_rope(q.reshape(b, t, cfg.num_heads, hd), positions, inv_freq)
    k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), positions, inv_freq)
    v = v.reshape(b, t, cfg.num_kv_heads, hd)
    # One token per row over a paged INT4 cache on a Pallas backend: write only, then attend through the
    # page table (no dequantized layer). The query is the row's newest token (position == cache length - 1,
    # as in generate / Engine decode); sliding windows and key_valid masks keep XLA.
    paged = None
    if cache is not None and t == 1 and key_valid is None and cfg.sliding_window is None:
      paged = cache.paged_layer(self.layer_index)
    if paged is not None and ops.resolve("attention_paged_kv4", paged, self.implementation) != "xla":
      cache = cache.write(self.layer_index, k, v, positions)
      out = ops.attention_paged_kv4(q[:, 0], cache.paged_layer(self.layer_index),
                                    implementation=self.implementation)
      return self.o_proj(out.reshape(b, t, cfg.num_heads * hd)), cache
    if cache is not None and t == 1:  # decode: no key past the newest position is visible
      cache = cache.write(self.layer_index, k, v, positions)
      key_positions = jnp.broadcast_to(jnp.arange(cache.max_len), (b, cache.max_len))
      mask = attention_mask(positions, key_positions, key_valid, cfg.sliding_window)
      read = functools.partial(cache.read, self.layer_index)
      out = decode_attention(q, read, mask, jnp.max(positions) + 1, cache.page_size)
      return self.o_proj(out.reshape(b, t, cfg.num_heads * hd)), cache
    if cache is None:
      keys, values, key_positions = k, v, positions
    else:
      cache, keys, values = cache.update(self.layer_index, k, v, positions)
      key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
    mask = attention_mask(positions, key_positions, key_valid, cfg.sliding_window)
    out = grouped_query_attention(q, keys, values, mask, causal_prefix=causal_prefix)
    return self.o_proj(out.reshape(b, t, cfg.num_heads * hd)), cache


# Scores per query chunk: B * Hq * chunk * S float32 elements. Chunks of about 4M elements stay in the CPU's
# caches; one [B, H, T, S] score tensor per layer does not (it ran 3-6x slower on stories260K windows).
SCORE_CHUNK_ELEMENTS = 1 << 22


def query_chunk(batch: int, heads: int, queries: int, keys: int) -> int:
  """Queries per attention chunk: a power of two (at least 16) keeping a chunk's scores near the budget."""
  budget = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * heads * keys))
  return min(queries, max(16, 1 << (budget.bit_length() - 1)))


def grouped_query_attention(q, k, v, mask, *, causal_prefix: bool = False):
  """Softmax attention in float32.  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S].

  Queries run in chunks (`query_chunk`). causal_prefix: query i sees no key index above i (a sequence
  from position 0 whose key index is its position), so a chunk reads only the keys up to its last query.
  """
  t, s = q.shape[1], k.shape[1]
  chunk = query_chunk(q.shape[0], q.shape[2], t, s)
  if chunk >= t:
    return _attend(q, k, v, mask)
  outs = []
  for start in range(0, t, chunk):
    stop = min(start + chunk, t)
    keys = min(stop, s) if causal_prefix else s
    outs.append(_attend(q[:, start:stop], k[:, :keys], v[:, :keys], mask[:, start:stop, :keys]))
  return jnp.concatenate(outs, axis=1)


# Decode reads the cache prefix that can hold visible keys, in power-of-two lengths from this one up.
DECODE_MIN_KEYS = 64


def decode_prefix_lengths(cache_len: int, granularity: int = 1) -> tuple[int, ...]:
  """The key-prefix lengths decode attention picks from: DECODE_MIN_KEYS (rounded up to a multiple of
  `granularity`, a cache's page size), its doublings below cache_len, then cache_len."""
  lengths, n = [], -(-DECODE_MIN_KEYS // granularity) * granularity
  while n < cache_len:
    lengths.append(n)
    n *= 2
  return tuple(lengths) + (cache_len,)


def decode_attention(q, read, mask, visible_keys, granularity: int = 1):
  """Attention of decode steps over a cache whose key index is the position: only the shortest prefix of
  `decode_prefix_lengths` holding `visible_keys` (a traced count: the newest position + 1) is read and
  attended, so a step costs O(position) rather than O(cache length); one compiled program holds a branch
  per prefix length. q: [B, 1, Hq, D]; read(n) -> (keys, values) [B, n, Hkv, D]; mask: [B, 1, S]."""
  lengths = decode_prefix_lengths(mask.shape[-1], granularity)
  def attend(n, q, mask):
    keys, values = read(n)
    return _attend(q, keys, values, mask[..., :n])
  if len(lengths) == 1:
    return attend(lengths[0], q, mask)
  index = sum((visible_keys > n).astype(jnp.int32) for n in lengths[:-1])
  return jax.lax.switch(index, [functools.partial(attend, n) for n in lengths], q, mask)


def _attend(q, k, v, mask):
  """One chunk of `grouped_query_attention`, laid out [B, Hkv, G * T, D] so both products are plain batched
  matmuls; a row with no visible key (padding) gives 0, not NaN."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  out_dtype = q.dtype
  q = q.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
  k = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
  v = v.astype(jnp.float32).transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkqd,bksd->bkqs", q * (1.0 / math.sqrt(d)), k).reshape(b, hkv, g, t, s)
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0))  # masked keys: exp(-inf) = 0
  total = jnp.sum(weights, axis=-1)  # [B, Hkv, G, T]
  out = jnp.einsum("bkqs,bksd->bkqd", weights.reshape(b, hkv, g * t, s), v).reshape(b, hkv, g, t, d)
  out = out / jnp.where(total > 0, total, 1.0)[..., None]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(out_dtype)


class MLP(nnx.Module):

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    dim, hidden = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=config.mlp_bias, dtype=config.dtype, rngs=rngs)
    self.gate_proj = Linear(dim, hidden, **kw)
    self.up_proj = Linear(dim, hidden, **kw)
    self.down_proj = Linear(hidden, dim, **kw)

  def __call__(self, x):
    gate, up = project(x, self.gate_proj, self.up_proj)
    return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, layer_index: int, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
    self.self_attn = Attention(config, layer_index, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, positions, inv_freq, cache, key_valid, causal_prefix=False):
    attn, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, cache, key_valid, causal_prefix)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
  """Decoder-only transformer.  `__call__(tokens, positions=None, cache=None) -> (logits, cache)`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(0.02)
    self.embed_tokens = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), config.dtype))
    self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
    self.lm_head = (None if config.tie_word_embeddings else
                    Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype, rngs=rngs))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache=None,
               key_valid: jax.Array | None = None, causal_prefix: bool | None = None):
    """tokens: [B, T] int; positions: [B, T] (default 0..T-1); cache: a KV cache or None.

    key_valid: [B, S] bool marks keys that may be attended (S = T without cache, the cache length
    with one); None means all. causal_prefix (static; default: positions is None) promises that token i
    sees no key index above i, i.e. a sequence from position 0 into an empty cache (padding tokens
    excepted: their outputs may differ, and are the caller's to ignore); attention then skips those keys.
    Returns float32 logits [B, T, vocab] and the updated cache.
    """
    b, t = tokens.shape
    if causal_prefix is None:
      causal_prefix = positions is None
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embedding = self.embed_tokens.get_value()  # float [V, d] or a QuantizedEmbedding (INT8 per row)
    if isinstance(embedding, QuantizedEmbedding):
      x = embedding.lookup(tokens, self.config.dtype)
    else:
      x = jnp.take(embedding, tokens, axis=0).astype(self.config.dtype)
    inv_freq = rope_inverse_frequencies(self.config)
    for layer in self.layers:
      x, cache = layer(x, positions, inv_freq, cache, key_valid, causal_prefix)
    x = self.norm(x)
    if self.lm_head is None and isinstance(embedding, QuantizedEmbedding):
      logits = embedding.logits(x)
    elif self.lm_head is None:
      logits = jnp.dot(x, embedding.T.astype(x.dtype))
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32), cache


def set_matmul_implementation(model: nnx.Module, implementation: str) -> nnx.Module:
  """Sets the backend of every `Linear` and `Attention` ("auto" | "xla" | "pallas" | "interpret"), in place
  (`Attention` uses it for INT4-cache decode, `ops.attention_paged_kv4`).

  The choice is static module state, so jitted functions retrace for it rather than reuse a stale trace.
  """
  ops.check_implementation(implementation)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (Linear, Attention)):
      node.implementation = implementation
  return model


# model -> (the projection kernels' arrays it was computed from, its shared_input_groups): generate asks at
# every call
_SHARED_INPUT_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def shared_input_groups(model: nnx.Module) -> tuple[tuple[tuple, ...], ...]:
  """Paths of the projections that read one input and quantize it identically (`formats.reads_the_same_input`):
  q / k / v, and gate / up, when calibration gave them one permutation and rotation (it does: they see the
  same statistics). Reads concrete arrays: call outside jit, pass the result to `hold_dequantized_weights`.
  Remembered per model while its kernels hold the same array objects (comparing values costs milliseconds)."""
  candidates = []  # (module path, projection names, their kernels)
  for i, layer in enumerate(model.layers):  # the layers directly: nnx's graph walk costs milliseconds
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
      module = getattr(layer, part)
      candidates.append((("layers", i, part), names, [getattr(module, n).kernel.get_value() for n in names]))
  arrays = jax.tree.leaves([group for _, _, group in candidates])  # the same objects while nothing is replaced
  known = _SHARED_INPUT_GROUPS.get(model)
  if known is not None and len(known[0]) == len(arrays) and all(a is b for a, b in zip(known[0], arrays)):
    return known[1]
  groups = []
  for path, names, group in candidates:
    same = [name for name, kernel in zip(names[1:], group[1:]) if reads_the_same_input(group[0], kernel)]
    if same:
      groups.append(tuple(path + (name,) for name in (names[0], *same)))
  _SHARED_INPUT_GROUPS[model] = (arrays, tuple(groups))
  return _SHARED_INPUT_GROUPS[model][1]


def hold_dequantized_weights(model: nnx.Module, shared_inputs: tuple[tuple[tuple, ...], ...] = ()) -> nnx.Module:
  """In place: every quantized kernel that runs on XLA held as a `DequantizedWeight`, for prefill and the
  decode loop on a CPU (called inside the jitted function, before the loop: dequantized once per call).
  Kernels on a Pallas backend keep their packed form. Small input transforms are folded into one matrix
  (`dequantized_leaf(fold_input=True)`): one product per step instead of gathers and butterflies.

  shared_inputs (`shared_input_groups`): in each group the later projections read their input through the
  first one's arrays, and `ops.linears` (`project`) then quantizes that input once instead of once per
  projection (bit for bit the same activations, 4 input quantizations per layer instead of 7) and multiplies
  it with the group's weights side by side (`with_joint_weight`) in one product."""
  for _, module in model.iter_modules():
    if isinstance(module, Linear):
      kernel = module.kernel.get_value()
      inner = kernel.inner if isinstance(kernel, InputTransformWeight) else kernel
      if isinstance(inner, QuantizedWeight) and ops.resolve("linear", inner, module.implementation) == "xla":
        module.kernel.set_value(dequantized_leaf(kernel, fold_input=True))
  modules = dict(model.iter_modules())
  for group in shared_inputs:
    kernels = [modules[path].kernel for path in group]
    if not all(is_held(kernel.get_value()) for kernel in kernels):
      continue  # a projection on a Pallas backend runs its own kernel
    leader = kernels[0].get_value()
    for kernel in kernels[1:]:
      kernel.set_value(with_input_arrays_of(kernel.get_value(), leader))
    for kernel, joint in zip(kernels, with_joint_weight([kernel.get_value() for kernel in kernels])):
      kernel.set_value(joint)
  return model


def init_llama(config: LlamaConfig, seed: int = 0) -> Llama:
  """A randomly initialized model (normal(0.02) weights, unit norms)."""
  return Llama(config, rngs=nnx.Rngs(seed))


def abstract_llama(config: LlamaConfig) -> Llama:
  """The model's structure with ShapeDtypeStruct leaves: for loading without initializing."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


TINY_CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_layers=5, num_heads=8,
                          num_kv_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
