"""`quantize(model, config, stats=None)`: a float Llama -> the same model with quantized linear kernels.

Quantization is a transform of the nnx state: every linear kernel that `config` quantizes becomes a
quantized leaf (`cometjax.core.formats.QuantizedWeight`, or an `InputTransformWeight` wrapping one when the
layer's input is zero-padded to a block multiple or rotated online; `cometjax.quant.layer`), and the
unchanged model code runs it through `cometjax.ops.linear`. With config.rotation the model is first
rotated (`cometjax.quant.rotation`), so the result may have an explicit lm_head where the float model tied
it to the embedding.

Typical use (statistics come from the calibration driver in `calib/`):
    windows = calib.stats.calibration_windows(tokenizer, documents, window=512)
    stats = calib.stats.collect_stats(model, config, windows)
    qmodel = quantize(model, config, stats)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cometjax.core.formats import (WEIGHT_LAYOUTS, InputTransformWeight, QuantizedWeight, is_quantized_leaf,
                                   quantize_embedding, quantize_weight)
from cometjax.errors import ConfigError
from cometjax.ops import registry
from cometjax.quant.config import QuantConfig
from cometjax.quant.layer import quantize_layer
from cometjax.quant.rotation import rotate_llama
from cometjax.quant.tree import linear_layers, node_at


def prepare_model(model, config: QuantConfig):
  """The float model that quantize() quantizes: rotated when config.rotation says so, else `model`."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name, path in linear_layers(pure).items():
    if is_quantized_leaf(node_at(pure, path)["kernel"]):
      raise ValueError(f"model is already quantized (layer {name!r}); pass the float model")
  if config.rotation == "hadamard":
    return rotate_llama(model)
  return model


def device_weight_layout() -> str:
  """The weight layout the device's preferred GEMM reads: "nk" (K-major) where the validation table prefers the
  Hopper kernel, else "kn"."""
  return "nk" if registry.preferred_kernel("w4ax_matmul") == "w4ax_matmul_sm90" else "kn"


def with_weight_layout(model, layout: str = "auto"):
  """The model with every 4-bit W4Ax weight's data stored in `layout` ("kn", "nk", or "auto":
  `device_weight_layout()`); numbers are unchanged, only which GEMM reads the bytes without a transpose."""
  layout = device_weight_layout() if layout == "auto" else layout
  if layout not in WEIGHT_LAYOUTS:
    raise ValueError(f"layout must be 'auto' or one of {WEIGHT_LAYOUTS}, got {layout!r}")

  def relayout(leaf):
    if isinstance(leaf, InputTransformWeight):
      return dataclasses.replace(leaf, inner=relayout(leaf.inner))
    if isinstance(leaf, QuantizedWeight) and leaf.bits == 4 and leaf.activation is not None:
      return leaf.with_layout(layout)
    return leaf

  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for _, path in linear_layers(pure).items():
    node = node_at(pure, path)
    node["kernel"] = relayout(node["kernel"])
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _int8_embeddings(pure: dict, scale_dtype: str) -> None:
  """In place: the token embedding INT8 per row, and a float (untied) lm_head INT8 per vocabulary column (an
  8-bit weight-only QuantizedWeight, one scale per output channel)."""
  pure["embed_tokens"] = quantize_embedding(pure["embed_tokens"], scale_dtype)
  head = pure.get("lm_head")
  if isinstance(head, dict) and not is_quantized_leaf(head.get("kernel")):
    kernel = jnp.asarray(head["kernel"], jnp.float32)  # [d, V]
    scales = quantize_weight(kernel, bits=8).scales.astype(scale_dtype)  # [1, V], as stored
    codes = jnp.clip(jnp.floor(kernel / scales.astype(jnp.float32) + 0.5), -127, 127).astype(jnp.int8)
    head["kernel"] = QuantizedWeight(data=codes, scales=scales, perm=None, bits=8, group_size=None,
                                     shape=tuple(kernel.shape))


def _bf16_embeddings(pure: dict) -> None:
  """In place: the token embedding, and a float (untied) lm_head kernel, stored as bfloat16 (the model reads
  them in its compute dtype either way)."""
  pure["embed_tokens"] = jnp.asarray(pure["embed_tokens"]).astype(jnp.bfloat16)
  head = pure.get("lm_head")
  if isinstance(head, dict) and not is_quantized_leaf(head.get("kernel")):
    head["kernel"] = jnp.asarray(head["kernel"]).astype(jnp.bfloat16)


def _store_embeddings(pure: dict, bits: int | None, scale_dtype: str) -> None:
  if bits == 8:
    _int8_embeddings(pure, scale_dtype)
  elif bits == 16:
    _bf16_embeddings(pure)


def with_embedding_bits(model, bits: int, scale_dtype: str = "float32"):
  """A copy of a (quantized) model whose token embedding, and a float untied lm_head, are stored as
  `embedding_bits` says (8: INT8 per row, 16: bfloat16), for a model already quantized without it."""
  if bits not in (8, 16):
    raise ValueError(f"bits must be 8 or 16, got {bits!r}")
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  _store_embeddings(pure, bits, scale_dtype)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _check_finite_stats(name: str, layer_stats) -> None:
  """NaN / inf in a layer's statistics would rank channels and scale weights silently wrong."""
  if layer_stats is None:
    return
  for field in ("absmax", "sumsq", "hessian", "samples"):
    value = getattr(layer_stats, field, None)
    if value is not None and not np.isfinite(np.asarray(value)).all():
      raise ConfigError(f"calibration stats of layer {name!r}: {field} holds non-finite values (NaN or inf); "
                        "the calibration forward pass overflowed or the model has non-finite weights")


def quantize(model, config: QuantConfig, stats=None, *, progress: bool = True):
  """The quantized model: every linear kernel config.quantizes() replaced by a quantized leaf.

  stats (`calib.stats.CalibrationStats`, collected with the same model and config) is required when
  config.needs_calibration (FMPQ INT8 blocks, or a weight method other than rtn).
  """
  if not isinstance(config, QuantConfig):
    raise ValueError(f"config must be a cometjax.quant.config.QuantConfig, got {type(config).__name__}")
  if config.needs_calibration and stats is None:
    raise ValueError("stats are required by this config (FMPQ channel ranking or weights.method="
                     f"{config.weights.method!r}); collect them with calib.stats.collect_stats(model, config, "
                     "windows)")
  if stats is not None and stats.rotation != config.rotation:
    raise ValueError(f"stats were collected with rotation={stats.rotation!r} but config.rotation="
                     f"{config.rotation!r}; collect them with this config")
  prepared = prepare_model(model, config)
  if config.weights is None:
    return prepared
  graphdef, state = nnx.split(prepared)
  pure = nnx.to_pure_dict(state)
  layers = {name: path for name, path in linear_layers(pure).items() if config.quantizes(name)}
  for name, path in tqdm(layers.items(), desc="quantize", unit="layer", disable=not progress):
    node = node_at(pure, path)
    layer_stats = stats.layer(name) if stats is not None else None
    _check_finite_stats(name, layer_stats)
    node["kernel"] = quantize_layer(name, node["kernel"], config, layer_stats)
  _store_embeddings(pure, config.embedding_bits, config.weights.scale_dtype)
  nnx.replace_by_pure_dict(state, pure)
  quantized = nnx.merge(graphdef, state)
  if device_weight_layout() != "kn":  # store the weights as the device's preferred GEMM reads them
    quantized = with_weight_layout(quantized, device_weight_layout())
  return quantized
