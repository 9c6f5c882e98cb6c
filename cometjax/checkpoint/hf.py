"""Hugging Face model directories: config.json -> `LlamaConfig`, single or sharded safetensors (read with
`safetensors.numpy`, never through torch) -> the Flax model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.checkpoint.io import read_safetensors
from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.tokenizers import HFTokenizer
from cometjax.checkpoint.validation import (build, check_layer_count, check_model_config, check_tensor, read_json_file,
                                            require)
from cometjax.errors import CheckpointError
from cometjax.models.llama import (SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, Llama, LlamaConfig, RopeScaling,
                                   abstract_llama)
from cometjax.quant.tree import node_at


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads transformers v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
  params = dict(d.get("rope_parameters") or {})
  if not params:
    params = dict(d.get("rope_scaling") or {})
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  if rope_type == "default":
    return theta, None
  if rope_type == "linear":
    return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
  if rope_type == "llama3":
    return theta, RopeScaling(
        rope_type="llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))
  raise CheckpointError(f"config field rope_type={rope_type!r} is not implemented "
                        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def config_from_hf(d: dict[str, Any], dtype=jnp.float32) -> LlamaConfig:
  """Our `LlamaConfig` from a Hugging Face config.json dict; unsupported features raise."""
  model_type = d.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
  if d.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"config field hidden_act={d['hidden_act']!r} is not implemented (only 'silu')")
  layer_types = d.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types) and model_type != "mistral":
    raise CheckpointError(f"config field layer_types={sorted(set(layer_types))} is not implemented "
                          "(only full_attention layers)")
  if model_type == "qwen2" and d.get("use_sliding_window"):
    raise CheckpointError("config field use_sliding_window=true (Qwen2 per-layer sliding window) is not implemented")
  sliding_window = d.get("sliding_window") if model_type == "mistral" else None
  theta, scaling = _rope_from_hf(d)
  attention_bias = bool(d.get("attention_bias", False))
  heads = d["num_attention_heads"]
  return LlamaConfig(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
      rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      qkv_bias=(model_type == "qwen2") or attention_bias, o_bias=attention_bias,
      mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=sliding_window,
      bos_token_id=d.get("bos_token_id"), eos_token_id=_as_ids(d.get("eos_token_id")),
      model_type=model_type, dtype=dtype)


_REQUIRED_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads")


def checked_config_from_hf(d: dict[str, Any], source: str, dtype=jnp.float32) -> LlamaConfig:
  """config_from_hf with every field it reads present and of its type (CheckpointError naming `source`)."""
  for key in _REQUIRED_INT_FIELDS:
    require(d, key, int, source)
  for key, kind in (("num_key_value_heads", (int, type(None))), ("head_dim", (int, type(None))),
                    ("max_position_embeddings", int), ("rms_norm_eps", float), ("rope_theta", float),
                    ("tie_word_embeddings", bool)):
    if key in d:
      require(d, key, kind, source)
  config = build(lambda: config_from_hf(d, dtype=dtype), source, "(config)")
  check_model_config(config, source)
  return config


def _as_ids(value):
  return tuple(value) if isinstance(value, list) else value


def hf_tensor_names(config: LlamaConfig) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
  """HF tensor name -> (our param path, HF shape, transpose?) for every tensor the model needs."""
  hd, dim = config.resolved_head_dim, config.hidden_size
  names = {"model.embed_tokens.weight": (("embed_tokens",), (config.vocab_size, dim), False),
           "model.norm.weight": (("norm", "weight"), (dim,), False)}
  if not config.tie_word_embeddings:
    names["lm_head.weight"] = (("lm_head", "kernel"), (config.vocab_size, dim), True)
  projections = {
      "self_attn.q_proj": (config.num_heads * hd, dim, config.qkv_bias),
      "self_attn.k_proj": (config.num_kv_heads * hd, dim, config.qkv_bias),
      "self_attn.v_proj": (config.num_kv_heads * hd, dim, config.qkv_bias),
      "self_attn.o_proj": (dim, config.num_heads * hd, config.o_bias),
      "mlp.gate_proj": (config.intermediate_size, dim, config.mlp_bias),
      "mlp.up_proj": (config.intermediate_size, dim, config.mlp_bias),
      "mlp.down_proj": (dim, config.intermediate_size, config.mlp_bias),
  }
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
      names[prefix + norm + ".weight"] = (("layers", i, norm, "weight"), (dim,), False)
    for proj, (out_f, in_f, bias) in projections.items():
      path = ("layers", i) + tuple(proj.split("."))
      names[prefix + proj + ".weight"] = (path + ("kernel",), (out_f, in_f), True)
      if bias:
        names[prefix + proj + ".bias"] = (path + ("bias",), (out_f,), False)
  return names


_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_weights(directory: Path) -> dict[str, np.ndarray]:
  """Every tensor of a HF directory: model.safetensors, or the shards model.safetensors.index.json lists."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = require(read_json_file(index, "shard index"), "weight_map", dict, str(index))
    if not all(isinstance(f, str) and f and "/" not in f for f in weight_map.values()):
      raise CheckpointError(f"{index}: field weight_map must map tensor names to file names in {directory}")
    files = sorted(set(weight_map.values()))
  elif (directory / "model.safetensors").exists():
    weight_map, files = None, ["model.safetensors"]
  else:
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = directory / name
    if not path.exists():
      listed = [t for t, f in (weight_map or {}).items() if f == name]
      raise CheckpointError(f"weight file {path} is missing (holds tensors such as {listed[:3]})")
    shard = read_safetensors(path)
    if weight_map is not None:
      for tensor_name, file_name in weight_map.items():
        if file_name == name and tensor_name not in shard:
          raise CheckpointError(f"tensor {tensor_name!r} is listed in the index for {name} but absent from it")
    tensors.update(shard)
  return tensors


def params_from_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray], source: str) -> Llama:
  """Builds the model from HF-named float tensors, checking names and shapes."""
  check_layer_count(source, config.num_layers, tensors, "model.layers.{}.input_layernorm.weight")
  expected = hf_tensor_names(config)
  missing = [n for n in expected if n not in tensors]
  if missing:
    raise CheckpointError(f"{source}: missing tensor {missing[0]!r}" +
                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  unexpected = [n for n in tensors if n not in expected and not n.endswith(_IGNORED_TENSOR_SUFFIXES)
                and not (config.tie_word_embeddings and n == "lm_head.weight")]
  if unexpected:
    raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (a feature this model family "
                          "does not implement, or a config/weights mismatch)")
  if config.tie_word_embeddings and "lm_head.weight" in tensors and not np.array_equal(
      np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])):
    raise CheckpointError(f"{source}: the config ties lm_head to the embedding (tie_word_embeddings), but tensor "
                          "'lm_head.weight' differs from 'model.embed_tokens.weight'")
  model = abstract_llama(config)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name, (path, shape, transpose) in expected.items():
    array = np.asarray(tensors[name])
    check_tensor(source, name, array, shape)
    node_at(pure, path[:-1])[path[-1]] = jnp.asarray(array.T if transpose else array, dtype=config.dtype)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load_hf(directory: str | Path, dtype=jnp.float32) -> LoadedModel:
  directory = Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{directory} has no config.json (expected a Hugging Face model directory)")
  config = checked_config_from_hf(read_json_file(config_path, "model config"), str(config_path), dtype=dtype)
  model = params_from_tensors(config, read_hf_weights(directory), str(directory))
  tokenizer = None
  if any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    tokenizer = HFTokenizer(directory)
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(directory))
