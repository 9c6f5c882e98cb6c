"""The MNIST diffusion checkpoints (DiT, CNN) and quantized diffusion folders written by
`cometjax sample --save-quantized`.

A quantized folder holds quantized.safetensors (the model's whole NNX state after `to_integer`) and
quantized.json (format name and version, the model kind, the setting, the `DiffusionQuantConfig`); it
rebuilds on top of the float checkpoint (quantizers attached, switched to integer, state restored).
Folders written before the format field existed read as version 1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx

from cometjax.checkpoint.io import read_safetensors, write_safetensors
from cometjax.checkpoint.validation import (build, check_all_used, check_dataclass_dict, check_tensor,
                                            read_json_file, require)
from cometjax.data import data_path
from cometjax.diffusion.attach import attach_quantizers, to_integer
from cometjax.diffusion.config import DiffusionQuantConfig
from cometjax.errors import CheckpointError
from cometjax.models.cnn_ddpm import CNNConfig, CNNDenoiser
from cometjax.models.dit import DiT, DiTConfig

MODEL_KINDS = ("dit", "cnn")
FORMAT = "cometjax-quantized-diffusion"
FORMAT_VERSION = 1
METADATA_FILE = "quantized.json"
WEIGHTS_FILE = "quantized.safetensors"


def read_float_checkpoint(folder: Path, config_cls, what: str):
  """(config, float32 numpy tensors) from a folder holding model.safetensors and, optionally, config.json
  (read with `config_cls.from_json`; else `config_cls()`)."""
  weights = Path(folder) / "model.safetensors"
  if not weights.exists():
    raise FileNotFoundError(f"{what} checkpoint not found: {weights} (set COMETJAX_DATA or pass path)")
  config_path = Path(folder) / "config.json"
  config = build(lambda: config_cls.from_json(config_path), str(config_path), "(config)") \
      if config_path.exists() else config_cls()
  return config, {k: np.asarray(v, np.float32) for k, v in read_safetensors(weights).items()}


def _checked_model(make, folder: Path, tensors: dict, config, *, with_label: bool):
  """The model `make` builds from the checkpoint's tensors, once a traced forward pass (no compute) shows
  every tensor's shape fits: a missing or misshapen tensor is a CheckpointError naming the folder."""
  import jax
  import jax.numpy as jnp
  source = str(Path(folder) / "model.safetensors")
  for name, array in tensors.items():
    check_tensor(source, name, array)
  try:
    model = make()
  except KeyError as e:
    raise CheckpointError(f"{source}: missing tensor {e.args[0]!r}") from None
  if with_label and tensors["label_emb.weight"].shape != (config.num_classes, config.hidden_size):
    raise CheckpointError(f"{source}: tensor 'label_emb.weight' has shape {list(tensors['label_emb.weight'].shape)}, "
                          f"expected {[config.num_classes, config.hidden_size]}")  # a gather clamps, never fails
  x = jax.ShapeDtypeStruct((1, config.in_channels, config.image_size, config.image_size), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  inputs = (x, t, t) if with_label else (x, t)
  try:
    out = jax.eval_shape(lambda *a: model(*a), *inputs)
  except (ValueError, TypeError, IndexError) as e:
    raise CheckpointError(f"{source}: the tensors do not fit the model config: {str(e).splitlines()[0]}") from None
  if out.shape != x.shape:
    raise CheckpointError(f"{source}: the model maps {list(x.shape)} to {list(out.shape)}, expected the input shape")
  return model


def load_dit(path=None) -> DiT:
  """The MNIST DiT from a folder with config.json + model.safetensors (default: the shared data)."""
  folder = Path(path) if path is not None else data_path("diffusion", "mnist_dit")
  config, tensors = read_float_checkpoint(folder, DiTConfig, "DiT")
  return _checked_model(lambda: DiT(tensors, config), folder, tensors, config, with_label=True)


def load_cnn(path=None) -> CNNDenoiser:
  """The MNIST CNN DDPM from a folder with config.json + model.safetensors (default: the shared data)."""
  folder = Path(path) if path is not None else data_path("diffusion", "mnist_cnn")
  config, tensors = read_float_checkpoint(folder, CNNConfig, "CNN")
  return _checked_model(lambda: CNNDenoiser(tensors, config), folder, tensors, config, with_label=False)


def load_diffusion(spec: str):
  """(model, kind) for "dit", "cnn" or a checkpoint folder (its tensor names tell the kind)."""
  if spec == "dit":
    return load_dit(), "dit"
  if spec == "cnn":
    return load_cnn(), "cnn"
  path = Path(spec)
  if not (path / "model.safetensors").exists():
    raise CheckpointError(f"model must be 'dit', 'cnn' or a folder with model.safetensors + config.json, "
                          f"got {spec!r}")
  names = set(read_safetensors(path / "model.safetensors"))
  if "label_emb.weight" in names:
    return load_dit(path), "dit"
  if "gt.frequencies" in names:
    return load_cnn(path), "cnn"
  raise CheckpointError(f"{path}: not a known diffusion checkpoint (no label_emb.weight / gt.frequencies)")


def save_quantized_diffusion(model, quant: DiffusionQuantConfig, kind: str, setting: str, folder) -> None:
  """Writes the quantized model's full NNX state and the settings that rebuild its graph (module docstring)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tensors = {".".join(str(p) for p in path): np.asarray(v.get_value())
             for path, v in nnx.to_flat_state(nnx.state(model))}
  write_safetensors(folder / WEIGHTS_FILE, tensors)
  (folder / METADATA_FILE).write_text(json.dumps(
      {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "setting": setting,
       "quant": dataclasses.asdict(quant)}, indent=2))


# DiffusionQuantConfig fields a folder written before they existed may lack (their defaults are what it used)
_QUANT_FIELDS_ADDED_LATER = ("keep_float", "act_bits_overrides", "act_granularity", "weight_group_size", "rotation")


def _quant_config(raw: dict) -> DiffusionQuantConfig:
  raw = dict(raw)
  raw["keep_float"] = tuple(raw.get("keep_float", ()))
  raw["act_bits_overrides"] = tuple((pattern, bits) for pattern, bits in raw.get("act_bits_overrides", ()))
  return DiffusionQuantConfig(**raw)


def _check_like(source: str, name: str, array: np.ndarray, template: np.ndarray) -> None:
  """A saved state tensor has the shape and dtype of the variable it restores, and finite floats."""
  if array.dtype != template.dtype:
    raise CheckpointError(f"{source}: tensor {name!r} has dtype {array.dtype.name}, expected "
                          f"{template.dtype.name}")
  check_tensor(source, name, array, template.shape, kind=template.dtype.name)


def load_quantized_diffusion(folder, model_spec: str | None = None):
  """(model, kind, quant config) from a folder written by `save_quantized_diffusion`; the float checkpoint
  comes from `model_spec` ("dit", "cnn", a folder) or, when None, the shared data of the saved kind."""
  folder = Path(folder)
  meta_path = folder / METADATA_FILE
  if not meta_path.exists():
    raise CheckpointError(f"{folder} has no {METADATA_FILE} (not a folder written by --save-quantized)")
  meta = read_json_file(meta_path, "quantized diffusion metadata")
  version = meta.get("format_version", 1)
  if meta.get("format", FORMAT) != FORMAT or version != FORMAT_VERSION:
    raise CheckpointError(f"{meta_path}: expected format {FORMAT} version {FORMAT_VERSION}, got "
                          f"{meta.get('format')!r} version {version!r}")
  if require(meta, "kind", str, str(meta_path)) not in MODEL_KINDS:
    raise CheckpointError(f"{meta_path}: field kind must be one of {MODEL_KINDS}, got {meta['kind']!r}")
  require(meta, "setting", str, str(meta_path))
  check_dataclass_dict(DiffusionQuantConfig, require(meta, "quant", dict, str(meta_path)), str(meta_path),
                       "quant.", optional=_QUANT_FIELDS_ADDED_LATER)
  quant = build(lambda: _quant_config(meta["quant"]), str(meta_path), "quant")
  model, kind = load_diffusion(model_spec if model_spec is not None else meta["kind"])
  if kind != meta["kind"]:
    raise CheckpointError(f"{folder} holds a quantized {meta['kind']!r} model, but the model given is {kind!r}")
  attach_quantizers(model, quant)
  to_integer(model)
  weights_path = str(folder / WEIGHTS_FILE)
  tensors = read_safetensors(folder / WEIGHTS_FILE)
  flat = []
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    name = ".".join(str(p) for p in path)
    if name not in tensors:
      raise CheckpointError(f"{weights_path}: tensor {name} is missing")
    _check_like(weights_path, name, tensors[name], np.asarray(variable.get_value()))
    variable.set_value(tensors[name])
    flat.append((path, variable))
  check_all_used(weights_path, tensors, {".".join(str(p) for p in path) for path, _ in flat})
  nnx.update(model, nnx.from_flat_state(flat))
  return model, kind, quant
