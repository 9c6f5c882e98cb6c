"""`quantization_report(model)`: per-layer formats and byte counts of a quantized model, plus totals."""

from __future__ import annotations

import jax
from flax import nnx

from cometjax.core.formats import ActivationFormat, InputTransformWeight, is_quantized_leaf
from cometjax.quant.tree import linear_layers, node_at


def _layer_row(name: str, leaf) -> dict:
  transform_bytes = leaf.transform_nbytes if isinstance(leaf, InputTransformWeight) else 0
  qw = leaf.inner if isinstance(leaf, InputTransformWeight) else leaf
  in_features = leaf.in_features
  fmt: ActivationFormat | None = qw.activation
  return dict(
      name=name, in_features=in_features, padded_in_features=qw.in_features, out_features=qw.out_features,
      weight_bits=qw.bits, group_size=qw.group_size,
      block_size=None if fmt is None else fmt.block_size, num_blocks=None if fmt is None else fmt.num_blocks,
      int8_blocks=None if fmt is None else fmt.num_int8_blocks,
      int4_block_fraction=None if fmt is None else fmt.int4_block_fraction,
      params=in_features * qw.out_features, weight_bytes=qw.nbytes, rotation_bytes=transform_bytes)


def quantization_report(model) -> dict:
  """Per-layer formats and byte counts, plus totals (weight bytes of quantized layers, float params)."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  layers = []
  for name, path in linear_layers(pure).items():
    leaf = node_at(pure, path)["kernel"]
    if is_quantized_leaf(leaf):
      layers.append(_layer_row(name, leaf))
  float_params = 0
  for leaf in jax.tree.leaves(pure, is_leaf=is_quantized_leaf):
    if not is_quantized_leaf(leaf) and hasattr(leaf, "size"):
      float_params += int(leaf.size)
  blocks = [(l["num_blocks"], l["int8_blocks"]) for l in layers if l["num_blocks"] is not None]
  total_blocks = sum(b for b, _ in blocks)
  params = sum(l["params"] for l in layers)
  weight_bytes = sum(l["weight_bytes"] for l in layers)
  return dict(
      layers=layers, quantized_params=params, weight_bytes=weight_bytes,
      bytes_per_param=weight_bytes / params if params else None,
      rotation_bytes=sum(l["rotation_bytes"] for l in layers), float_params=float_params,
      int4_block_fraction=(sum(b - i for b, i in blocks) / total_blocks) if total_blocks else None)
