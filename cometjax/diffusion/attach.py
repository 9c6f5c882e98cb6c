"""Attaching QuEST's quantizers to a diffusion model and switching it to integer execution, in place."""

from __future__ import annotations

import re
from typing import Iterator

import jax.numpy as jnp
from flax import nnx

from cometjax.core.rotations import rotate_rows
from cometjax.diffusion.config import DiffusionQuantConfig
from cometjax.diffusion.quantizers import LinearQuantizer, MatmulQuantizer, rotation_blocks
from cometjax.models.layers import QuantLinear, QuantMatmul


def named_modules(model: nnx.Module, kind) -> Iterator[tuple[str, nnx.Module]]:
  """(dotted path, module) for every submodule of type `kind`, in a stable order."""
  for path, module in nnx.iter_graph(model):
    if isinstance(module, kind):
      yield ".".join(str(p) for p in path), module


def _layer_bits(name: str, layer: QuantLinear, config: DiffusionQuantConfig) -> tuple[int, int | None]:
  """(weight bits, activation bits) of one layer: the overrides, then the edge-layer minimums."""
  act_bits, weight_bits = config.act_bits, config.weight_bits
  override = next((bits for pattern, bits in config.act_bits_overrides if re.search(pattern, name)), None)
  if override is not None and act_bits is not None:
    act_bits = override
  if layer.edge:
    weight_bits = max(weight_bits, config.edge_weight_bits)
    act_bits = max(act_bits, config.edge_act_bits) if act_bits is not None else None
  return weight_bits, act_bits


def attach_quantizers(model: nnx.Module, config: DiffusionQuantConfig) -> nnx.Module:
  """Attach fresh (uncalibrated) quantizers to every QuantLinear/QuantMatmul of `model`, in place.

  With config.rotation the kernels of the rotated layers become R^T W (their quantizer holds R), so a
  model whose kernels were rotated cannot take quantizers again: load it afresh.
  """
  keep = [re.compile(p) for p in config.keep_float]
  for name, layer in named_modules(model, QuantLinear):
    if layer.quant is not None and layer.quant.rotates_input:
      raise ValueError(f"layer {name}: its kernel was rotated by an earlier attach_quantizers(rotation="
                       "'hadamard'); attach quantizers to a freshly loaded model")
    if any(p.search(name) for p in keep):
      continue
    weight_bits, act_bits = _layer_bits(name, layer, config)
    group_size = config.weight_group_size
    if group_size is not None and layer.kernel.shape[0] % group_size:
      group_size = None  # e.g. a 3x3 conv on one channel (K = 9): per-output-channel scales
    blocks = None
    if config.rotation is not None and act_bits is not None:
      blocks = rotation_blocks(layer.kernel.shape[0])
      if blocks is not None:
        layer.kernel[...] = rotate_rows(layer.kernel[...], jnp.asarray(blocks))
    layer.quant = LinearQuantizer(layer.kernel[...], weight_bits, act_bits, config.num_timestep_groups,
                                  config.act_granularity, group_size, blocks)
  if config.quantize_attention_matmuls and config.act_bits is not None:
    for name, matmul in named_modules(model, QuantMatmul):
      if any(p.search(name) for p in keep):
        continue
      lhs_bits = max(config.act_bits, config.softmax_bits) if matmul.softmax_lhs else config.act_bits
      matmul.quant = MatmulQuantizer(lhs_bits, config.act_bits, config.num_timestep_groups)
  return model


def to_integer(model: nnx.Module) -> nnx.Module:
  """Switch every quantized layer to real integer execution (packed weights), in place."""
  for _, layer in named_modules(model, QuantLinear):
    if layer.quant is not None:
      layer.quant.to_integer(layer.kernel[...])
  for _, matmul in named_modules(model, QuantMatmul):
    if matmul.quant is not None:
      matmul.quant.execution = "integer"
  return model


def set_recording(model: nnx.Module, on: bool) -> None:
  for _, module in nnx.iter_graph(model):
    if isinstance(module, (QuantLinear, QuantMatmul)):
      module.record = on
