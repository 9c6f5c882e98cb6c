"""`quantization_report(model)`: per-layer formats and the bytes of everything a quantized model stores.

Every array of the parameter tree is counted once, in the dtype it is stored in:
  weight_bytes     packed codes + scales + zero points of the quantized linear layers
  perm_bytes       their FMPQ channel permutations (int32)
  rotation_bytes   their online rotations (signs of `HadamardRotation`s, or dense matrices of format version 2)
  embedding_bytes  the token embedding (float, or INT8 codes + per-row scales)
  float_bytes      every other array: norms, a float lm_head, layers kept in float
  total_bytes      the sum: what `save_quantized` writes as tensor data (the directory adds only its JSON
                   metadata, the safetensors header and the tokenizer files)
`params` counts the parameters of the float model the tree stands for (a quantized linear as its unpadded
in x out); `bytes_per_param` is total_bytes / params, and `weight_bytes_per_param` the older figure over the
quantized linear layers alone.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from cometjax.core.formats import (ActivationFormat, InputTransformWeight, QuantizedEmbedding, QuantizedWeight,
                                   is_quantized_leaf)
from cometjax.quant.tree import linear_layers, node_at


def _layer_row(name: str, leaf) -> dict:
  outer = leaf if isinstance(leaf, InputTransformWeight) else None
  qw: QuantizedWeight = leaf.inner if outer is not None else leaf
  fmt: ActivationFormat | None = qw.activation
  perm_bytes = sum(int(p.nbytes) for p in (qw.perm, None if outer is None else outer.perm) if p is not None)
  return dict(
      name=name, in_features=leaf.in_features, padded_in_features=qw.in_features, out_features=qw.out_features,
      weight_bits=qw.bits, group_size=qw.group_size, asymmetric=qw.asymmetric,
      block_size=None if fmt is None else fmt.block_size, num_blocks=None if fmt is None else fmt.num_blocks,
      int8_blocks=None if fmt is None else fmt.num_int8_blocks,
      int4_block_fraction=None if fmt is None else fmt.int4_block_fraction,
      params=leaf.in_features * qw.out_features,
      weight_bytes=qw.nbytes - (0 if qw.perm is None else int(qw.perm.nbytes)), perm_bytes=perm_bytes,
      rotation_bytes=0 if outer is None else outer.rotation_nbytes)


def quantization_report(model) -> dict:
  """Per-layer rows and byte totals of a (quantized) Llama (module docstring)."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  layers, kernels = [], set()
  for name, path in linear_layers(pure).items():
    leaf = node_at(pure, path)["kernel"]
    if is_quantized_leaf(leaf):
      layers.append(_layer_row(name, leaf))
      kernels.add(id(leaf))
  embedding = pure.get("embed_tokens")
  embedding_bytes = int(embedding.nbytes)
  embedding_params = int(np.prod(embedding.shape))
  float_bytes, float_params = 0, 0
  for leaf in jax.tree.leaves({k: v for k, v in pure.items() if k != "embed_tokens"}, is_leaf=is_quantized_leaf):
    if id(leaf) in kernels:
      continue
    if hasattr(leaf, "size"):  # norms, biases, float kernels (every quantized kernel is a layer row)
      float_bytes += int(leaf.nbytes)
      float_params += int(leaf.size)
  blocks = [(l["num_blocks"], l["int8_blocks"]) for l in layers if l["num_blocks"] is not None]
  total_blocks = sum(b for b, _ in blocks)
  quantized_params = sum(l["params"] for l in layers)
  totals = {key: sum(l[key] for l in layers) for key in ("weight_bytes", "perm_bytes", "rotation_bytes")}
  total_bytes = sum(totals.values()) + embedding_bytes + float_bytes
  params = quantized_params + embedding_params + float_params
  return dict(
      layers=layers, quantized_params=quantized_params, params=params, **totals,
      embedding_bytes=embedding_bytes, embedding_int8=isinstance(embedding, QuantizedEmbedding),
      float_bytes=float_bytes, float_params=float_params, total_bytes=total_bytes,
      bytes_per_param=total_bytes / params,
      weight_bytes_per_param=totals["weight_bytes"] / quantized_params if quantized_params else None,
      int4_block_fraction=(sum(b - i for b, i in blocks) / total_blocks) if total_blocks else None)
