"""Quantized LLM directories written by `cometjax quantize`: they load without the original checkpoint.

DIR/model.safetensors holds every array (packed weights, scales, zero points, permutations, rotation signs,
the float or INT8 embedding, float leaves); DIR/quantization.json holds the format name and version, the
Llama config, the QuantConfig, the per-layer formats, the dtype of every tensor and how the tokenizer was
copied and (optional, checked on load) sha256 digests of the weights file and of the metadata.
The tensor bytes are exactly `quantization_report(model)["total_bytes"]`.

Format version 3 (written): a per-token activation scale per FMPQ block (`ActivationFormat` saved whole),
asymmetric weights (`.kernel.zeros`), rotations as signed Hadamard blocks (`.kernel.input_rotation_signs`,
`.kernel.input_region_signs`, their block sizes in the JSON) or dense matrices, an INT8 embedding
(`embed_tokens.data`, `embed_tokens.scales`). Version 2 (read): one activation scale per precision region
(loaded with scale_span="region", the same numbers as before) and dense input rotations.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from cometjax.checkpoint.gguf_vocab import TOKENIZER_FILE, write_tokenizer_metadata
from cometjax.checkpoint.io import (from_storable, gguf_metadata, open_gguf, read_safetensors, to_storable,
                                    write_safetensors)
from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.tokenizers import HFTokenizer, load_tokenizer
from cometjax.checkpoint.validation import (INTEGRITY_FIELD, build, check_all_used, check_dataclass_dict,
                                            check_digest, check_layer_count, check_model_config, check_quantized_leaf,
                                            check_quantized_metadata, check_stored_dtype, check_tensor,
                                            content_digest, read_json_file)
from cometjax.core.formats import (ActivationFormat, InputTransformWeight, QuantizedEmbedding, QuantizedWeight,
                                   is_quantized_leaf)
from cometjax.core.rotations import HadamardRotation
from cometjax.errors import CheckpointError
from cometjax.models.llama import LlamaConfig, RopeScaling, abstract_llama
from cometjax.quant.config import QuantConfig, config_from_dict
from cometjax.quant.transform import device_weight_layout, with_weight_layout
from cometjax.quant.tree import float_leaves, linear_layers, node_at

FORMAT = "cometjax-quantized"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: one activation scale per precision region, dense input rotations
METADATA_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def llama_config_to_dict(config: LlamaConfig) -> dict:
  d = dataclasses.asdict(config)
  d["dtype"] = jnp.dtype(config.dtype).name
  if isinstance(d.get("eos_token_id"), tuple):
    d["eos_token_id"] = list(d["eos_token_id"])
  return d


def llama_config_from_dict(d: dict) -> LlamaConfig:
  d = dict(d)
  d["dtype"] = jnp.dtype(d["dtype"])
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  if isinstance(d.get("eos_token_id"), list):
    d["eos_token_id"] = tuple(d["eos_token_id"])
  return LlamaConfig(**d)


def _copy_tokenizer(source, directory: Path) -> dict | None:
  if source is None:
    return None
  source = Path(source)
  if source.is_dir():
    copied = [f for f in HF_TOKENIZER_FILES if (source / f).exists()]
    if not copied:
      raise ValueError(f"tokenizer_source {source} holds none of {HF_TOKENIZER_FILES}")
    for f in copied:
      shutil.copyfile(source / f, directory / f)
    return dict(kind="hf", files=copied)
  if source.is_file() and source.suffix == ".gguf":  # the tokenizer metadata only, not the weights
    write_tokenizer_metadata(directory / TOKENIZER_FILE, gguf_metadata(open_gguf(source)))
    return dict(kind="gguf", files=[TOKENIZER_FILE])
  if source.is_file() and source.suffix in (".model", ".bin"):
    shutil.copyfile(source, directory / source.name)
    return dict(kind="file", files=[source.name])
  raise ValueError(f"tokenizer_source must be a HF tokenizer directory or a .gguf/.model/.bin file, got {source}")


def _rotation_kind(part) -> tuple[str | None, int | None]:
  if isinstance(part, HadamardRotation):
    return "hadamard", part.block
  return (None, None) if part is None else ("dense", None)


def _layer_metadata(leaf) -> dict:
  outer = leaf if isinstance(leaf, InputTransformWeight) else None
  qw = leaf.inner if outer is not None else leaf
  fmt = qw.activation
  transform = None
  if outer is not None:
    rotation, rotation_block = _rotation_kind(outer.rotation)
    region, region_block = _rotation_kind(outer.region)
    transform = dict(rotation=rotation, rotation_block=rotation_block, perm=outer.perm is not None, region=region,
                     region_block=region_block, region_start=outer.region_start)
  return dict(
      bits=qw.bits, group_size=qw.group_size, shape=list(qw.shape), in_features=leaf.in_features,
      transformed=outer is not None, has_perm=qw.perm is not None, has_zeros=qw.zeros is not None,
      transform=transform, activation=None if fmt is None else dataclasses.asdict(fmt))


def save_quantized(directory, model, quant_config: QuantConfig, tokenizer_source=None) -> None:
  """Writes DIR/model.safetensors and DIR/quantization.json (module docstring) and copies the tokenizer
  files from `tokenizer_source` (a HF dir or a .model/.bin; for a .gguf, its tokenizer metadata as
  tokenizer.gguf.json)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  tensors, dtypes, layers = {}, {}, {}

  def put(key, value):
    tensors[key], dtypes[key] = to_storable(value)

  for name, path in linear_layers(pure).items():
    node = node_at(pure, path)
    leaf = node["kernel"]
    if not is_quantized_leaf(leaf):
      continue
    layers[name] = _layer_metadata(leaf)
    qw = (leaf.inner if isinstance(leaf, InputTransformWeight) else leaf).with_layout("kn")  # one layout on disk
    for part in ("data", "scales", "zeros", "perm"):
      if getattr(qw, part) is not None:
        put(f"{name}.kernel.{part}", getattr(qw, part))
    if isinstance(leaf, InputTransformWeight):
      for part in ("rotation", "perm", "region"):
        value = getattr(leaf, part)
        if isinstance(value, HadamardRotation):
          put(f"{name}.kernel.input_{part}_signs", value.signs)
        elif value is not None:
          put(f"{name}.kernel.input_{part}", value)
    node["kernel"] = None
  embedding = pure.get("embed_tokens")
  if isinstance(embedding, QuantizedEmbedding):
    put("embed_tokens.data", embedding.data)
    put("embed_tokens.scales", embedding.scales)
    pure["embed_tokens"] = None
  for key, path in float_leaves(pure).items():
    put(key, node_at(pure, path))
  tokenizer = _copy_tokenizer(tokenizer_source, directory)
  write_safetensors(directory / WEIGHTS_FILE, tensors)
  metadata = dict(format=FORMAT, format_version=FORMAT_VERSION, model_config=llama_config_to_dict(model.config),
                  quant_config=quant_config.to_dict(), layers=layers, dtypes=dtypes, tokenizer=tokenizer,
                  embedding="int8" if isinstance(embedding, QuantizedEmbedding) else "float")
  metadata[INTEGRITY_FIELD] = content_digest(json.loads(json.dumps(metadata)), directory / WEIGHTS_FILE)
  (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=1))


def _input_rotation(kind, block, name: str, part: str, get):
  if kind == "hadamard":
    return HadamardRotation(signs=get(f"{name}.kernel.input_{part}_signs"), block=block)
  return get(f"{name}.kernel.input_{part}") if kind else None


def _quantized_leaf(name: str, info: dict, get, version: int):
  act = info["activation"]
  if act is not None and version == 2:  # version 2 shared one per-token scale over each precision region
    act = dict(act, scale_span="region")
  qw = QuantizedWeight(
      data=get(f"{name}.kernel.data"), scales=get(f"{name}.kernel.scales"),
      perm=get(f"{name}.kernel.perm") if info["has_perm"] else None, bits=info["bits"],
      group_size=info["group_size"], shape=tuple(info["shape"]),
      activation=None if act is None else ActivationFormat(**act),
      zeros=get(f"{name}.kernel.zeros") if info.get("has_zeros") else None)
  qw.check_arrays()
  if not info["transformed"]:
    return qw
  t = info["transform"]
  if version == 2:  # booleans: dense matrices
    t = dict(t, rotation="dense" if t["rotation"] else None, region="dense" if t["region"] else None)
  return InputTransformWeight(
      inner=qw, in_features=info["in_features"], region_start=t["region_start"],
      rotation=_input_rotation(t["rotation"], t.get("rotation_block"), name, "rotation", get),
      perm=get(f"{name}.kernel.input_perm") if t["perm"] else None,
      region=_input_rotation(t["region"], t.get("region_block"), name, "region", get))


def _read_metadata(directory: Path) -> tuple[dict, LlamaConfig, QuantConfig]:
  """(metadata, model config, quant config) of DIR/quantization.json, every field checked."""
  meta_path = directory / METADATA_FILE
  source = str(meta_path)
  meta = read_json_file(meta_path, "quantization metadata")
  if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
    raise CheckpointError(f"{meta_path}: expected format {FORMAT} version {' or '.join(map(str, READABLE_VERSIONS))}, "
                          f"got {meta.get('format')!r} version {meta.get('format_version')!r}")
  check_quantized_metadata(meta, source)
  check_dataclass_dict(LlamaConfig, meta["model_config"], source, "model_config.")
  config = build(lambda: llama_config_from_dict(meta["model_config"]), source, "model_config")
  check_model_config(config, f"{source}: model_config")
  quant_config = build(lambda: config_from_dict(meta["quant_config"]), source, "quant_config")
  for name, info in meta["layers"].items():
    weights, acts = quant_config.weights, quant_config.activations
    if weights is None or info["bits"] != weights.bits or (info["activation"] is None) != (acts is None):
      raise CheckpointError(f"{source}: layers.{name} (bits={info['bits']}, activation={info['activation']}) "
                            f"disagrees with quant_config (weights={weights}, activations={acts})")
  return meta, config, quant_config


def load_quantized(directory) -> LoadedModel:
  """`LoadedModel` (with `.quant_config`) from a directory written by `save_quantized`; needs no original
  checkpoint. `cometjax.load(DIR)` dispatches here when DIR holds quantization.json. Every metadata field
  and tensor is checked (`cometjax.checkpoint.validation`) before the model is returned."""
  directory = Path(directory)
  if not (directory / METADATA_FILE).exists():
    raise CheckpointError(f"{directory} has no {METADATA_FILE} (not a cometjax quantized model directory)")
  meta, config, quant_config = _read_metadata(directory)
  weights_path = directory / WEIGHTS_FILE
  check_digest(meta, weights_path, str(directory))
  tensors = read_safetensors(weights_path)
  dtypes, used = meta["dtypes"], set()
  version = meta["format_version"]

  def get(key):
    if key not in tensors:
      raise CheckpointError(f"{weights_path} lacks tensor {key!r}")
    if key not in dtypes:
      raise CheckpointError(f"{directory / METADATA_FILE}: field dtypes.{key} is missing")
    check_stored_dtype(str(weights_path), key, tensors[key], dtypes[key])
    used.add(key)
    return from_storable(tensors[key], dtypes[key])

  check_layer_count(str(weights_path), config.num_layers, tensors, "layers.{}.input_layernorm.weight")
  graphdef, state = nnx.split(abstract_llama(config))
  pure = nnx.to_pure_dict(state)
  for name, path in linear_layers(pure).items():
    node = node_at(pure, path)
    info = meta["layers"].get(name)
    expected = tuple(node["kernel"].shape)
    if info is None:
      node["kernel"] = get(f"{name}.kernel")
      check_tensor(str(weights_path), f"{name}.kernel", node["kernel"], expected)
      continue
    node["kernel"] = build(lambda: _quantized_leaf(name, info, get, version), str(directory / METADATA_FILE),
                           f"layers.{name}")
    check_quantized_leaf(str(weights_path), name, node["kernel"], expected)
  embedding_shape = tuple(pure["embed_tokens"].shape)
  int8_embedding = meta.get("embedding", "float") == "int8"
  if int8_embedding:
    pure["embed_tokens"] = None
  for key, path in float_leaves(pure).items():
    expected = tuple(node_at(pure, path).shape)
    node_at(pure, path[:-1])[path[-1]] = get(key)
    check_tensor(str(weights_path), key, node_at(pure, path), expected)
  if int8_embedding:
    embedding = QuantizedEmbedding(data=get("embed_tokens.data"), scales=get("embed_tokens.scales"))
    check_tensor(str(weights_path), "embed_tokens.data", embedding.data, embedding_shape, kind="int8")
    check_tensor(str(weights_path), "embed_tokens.scales", embedding.scales, embedding_shape[:1])
    pure["embed_tokens"] = embedding
  unknown_layers = sorted(set(meta["layers"]) - set(linear_layers(pure)))
  if unknown_layers:
    raise CheckpointError(f"{directory / METADATA_FILE}: layers.{unknown_layers[0]} is not a linear layer of "
                          "this model config")
  check_all_used(str(weights_path), tensors, used)
  nnx.replace_by_pure_dict(state, pure)
  model = nnx.merge(graphdef, state)
  if device_weight_layout() != "kn":  # the layout the device's preferred GEMM reads
    model = with_weight_layout(model, device_weight_layout())
  tokenizer = None
  tok = meta["tokenizer"]
  if tok is not None:
    missing = [f for f in tok["files"] if not (directory / f).is_file()]
    if missing:
      raise CheckpointError(f"{directory}: tokenizer file {missing[0]} listed in {METADATA_FILE} is missing")
    tokenizer = (HFTokenizer(directory) if tok["kind"] == "hf"
                 else load_tokenizer(directory / tok["files"][0], config.vocab_size))
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(directory),
                     quant_config=quant_config)
