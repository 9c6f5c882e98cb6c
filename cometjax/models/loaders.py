"""Checkpoint loaders: Hugging Face model directories and llama2.c `.bin` files, plus tokenizers.

`load(path)` -> `LoadedModel(model, tokenizer, config, source)`. Weights are read with `safetensors`
(numpy) or numpy, never through torch; tokenizers come from transformers' AutoTokenizer (HF dirs),
sentencepiece (`.model`) or our reader of the llama2.c `tokenizer.bin` format.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Iterable, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.models.llama import (SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, Llama, LlamaConfig, RopeScaling,
                                   abstract_llama)


QUANTIZED_METADATA = "quantization.json"  # marks a directory written by cometjax.quantize.save_quantized


class CheckpointError(ValueError):
  """A checkpoint is missing, truncated, malformed or uses a feature we do not implement."""


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None
  vocab_size: int

  def encode(self, text: str, bos: bool = True) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class HFTokenizer:
  """transformers' AutoTokenizer from a local directory (offline)."""

  def __init__(self, directory: str | Path):
    from transformers import AutoTokenizer
    self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    self.bos_id = self._tok.bos_token_id
    self.eos_id = self._tok.eos_token_id
    self.vocab_size = len(self._tok)

  def encode(self, text: str, bos: bool = True) -> list[int]:
    ids = self._tok(text, add_special_tokens=False, verbose=False).input_ids
    return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer:
  """A SentencePiece `.model` file (llama2.c's tok512.model, Llama-2's tokenizer.model)."""

  def __init__(self, path: str | Path):
    import sentencepiece
    self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str, bos: bool = True) -> list[int]:
    return ([self.bos_id] if bos and self.bos_id is not None else []) + list(self._sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


class Llama2cTokenizer:
  """llama2.c's `tokenizer.bin`: pieces with merge scores, encoded greedily as in its run.c.

  Like run.c it prepends a dummy-prefix space and does not collapse runs of spaces (so it can differ
  from SentencePiece on text with repeated spaces).
  """

  def __init__(self, path: str | Path, vocab_size: int):
    data = Path(path).read_bytes()
    pieces, scores, offset = [], [], 4
    try:
      for _ in range(vocab_size):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        pieces.append(data[offset:offset + length])
        if len(pieces[-1]) != length:
          raise struct.error("short piece")
        scores.append(score)
        offset += length
    except struct.error as e:
      raise CheckpointError(f"tokenizer file {path} is truncated: expected {vocab_size} pieces ({e})") from None
    self.pieces = pieces
    self.scores = scores
    self.vocab_size = vocab_size
    self.bos_id, self.eos_id = 1, 2
    self._index = {p: i for i, p in enumerate(pieces)}

  def encode(self, text: str, bos: bool = True) -> list[int]:
    ids = []
    if text:
      for ch in " " + text:
        piece = ch.encode("utf-8")
        if piece in self._index:
          ids.append(self._index[piece])
        else:
          ids.extend(b + 3 for b in piece)  # byte fallback: ids 3..258 are <0x00>..<0xFF>
    while True:  # merge the best-scoring adjacent pair until none is in the vocabulary
      best, best_i, best_id = -1e10, -1, -1
      for i in range(len(ids) - 1):
        merged = self._index.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
        if merged is not None and self.scores[merged] > best:
          best, best_i, best_id = self.scores[merged], i, merged
      if best_i < 0:
        break
      ids[best_i:best_i + 2] = [best_id]
    return ([self.bos_id] if bos else []) + ids

  def decode(self, ids: Iterable[int]) -> str:
    out, previous = bytearray(), None
    for i in ids:
      if i in (self.bos_id, self.eos_id):
        previous = i
        continue
      piece = self.pieces[i]
      if previous == self.bos_id and piece.startswith(b" "):
        piece = piece[1:]
      if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
        piece = bytes([int(piece[3:5], 16)])
      out += piece
      previous = i
    return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------
# Hugging Face configs and weights

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


def _read_safetensors(directory: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
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
    try:
      shard = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on truncated headers/data
      raise CheckpointError(f"cannot read weight file {path}: {e}") from e
    if weight_map is not None:
      for tensor_name, file_name in weight_map.items():
        if file_name == name and tensor_name not in shard:
          raise CheckpointError(f"tensor {tensor_name!r} is listed in the index for {name} but absent from it")
    tensors.update(shard)
  return tensors


def params_from_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray], source: str) -> Llama:
  """Builds the model from HF-named float tensors, checking names and shapes."""
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
  model = abstract_llama(config)
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name, (path, shape, transpose) in expected.items():
    array = np.asarray(tensors[name])
    if tuple(array.shape) != shape:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise CheckpointError(f"{source}: tensor {name!r} has dtype {array.dtype}, expected a float type")
    node = pure
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = jnp.asarray(array.T if transpose else array, dtype=config.dtype)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load_hf(directory: str | Path, dtype=jnp.float32) -> "LoadedModel":
  directory = Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{directory} has no config.json (expected a Hugging Face model directory)")
  config = config_from_hf(json.loads(config_path.read_text()), dtype=dtype)
  model = params_from_tensors(config, _read_safetensors(directory), str(directory))
  tokenizer = None
  if any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    tokenizer = HFTokenizer(directory)
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(directory))


def read_float_checkpoint(folder: Path, config_cls, what: str):
  """(config, float32 numpy tensors) from a folder holding model.safetensors and, optionally, config.json
  (read with `config_cls.from_json`; else `config_cls()`). The diffusion checkpoints use this."""
  from safetensors.numpy import load_file
  weights = folder / "model.safetensors"
  if not weights.exists():
    raise FileNotFoundError(f"{what} checkpoint not found: {weights} (set COMETJAX_DATA or pass path)")
  config = config_cls.from_json(folder / "config.json") if (folder / "config.json").exists() else config_cls()
  return config, {k: np.asarray(v, np.float32) for k, v in load_file(str(weights)).items()}


# ----------------------------------------------------------------------------------------------
# llama2.c


def _rotate_half_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama2.c's interleaved RoPE pairs (2i, 2i+1) -> HF's rotate_half halves, per head."""
  out_f, in_f = w.shape
  hd = out_f // n_heads
  return w.reshape(n_heads, hd // 2, 2, in_f).transpose(0, 2, 1, 3).reshape(out_f, in_f)


def read_llama2c(path: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """A llama2.c v0 `.bin` as (config, HF-named tensors with q/k rows in the rotate_half layout)."""
  path = Path(path)
  raw = path.read_bytes()
  if len(raw) < 28:
    raise CheckpointError(f"{path} is too short for a llama2.c header (28 bytes), got {len(raw)}")
  if raw[:4] == b"ak42"[::-1] or struct.unpack_from("<I", raw)[0] == 0x616B3432:
    raise CheckpointError(f"{path} is a llama2.c v1/v2 export; only the legacy v0 format is supported")
  dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw)
  if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0:
    raise CheckpointError(f"{path}: invalid llama2.c header {(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)}")
  shared = vocab > 0
  vocab = abs(vocab)
  hd = dim // n_heads
  shapes = [
      ("token_embedding", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
      ("wk", (n_layers, n_kv * hd, dim)), ("wv", (n_layers, n_kv * hd, dim)), ("wo", (n_layers, dim, dim)),
      ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
      ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("freq_cis_real", (seq_len, hd // 2)),
      ("freq_cis_imag", (seq_len, hd // 2))]
  if not shared:
    shapes.append(("wcls", (vocab, dim)))
  floats = np.frombuffer(raw, dtype="<f4", offset=28)
  arrays, offset = {}, 0
  for name, shape in shapes:
    size = int(np.prod(shape))
    if offset + size > floats.size:
      raise CheckpointError(f"{path} is truncated: tensor {name!r} {shape} needs {(offset + size) * 4 + 28} "
                            f"bytes, the file has {len(raw)}")
    arrays[name] = floats[offset:offset + size].reshape(shape)
    offset += size
  if offset != floats.size:
    raise CheckpointError(f"{path} has {(floats.size - offset) * 4} trailing bytes after the last tensor "
                          "(not a llama2.c v0 file of this header?)")
  config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=n_layers,
                       num_heads=n_heads, num_kv_heads=n_kv, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=seq_len, tie_word_embeddings=shared, bos_token_id=1,
                       eos_token_id=2, model_type="llama")
  tensors = {"model.embed_tokens.weight": arrays["token_embedding"], "model.norm.weight": arrays["rms_final"]}
  if not shared:
    tensors["lm_head.weight"] = arrays["wcls"]
  for i in range(n_layers):
    p = f"model.layers.{i}."
    tensors[p + "input_layernorm.weight"] = arrays["rms_att"][i]
    tensors[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
    tensors[p + "self_attn.q_proj.weight"] = _rotate_half_rows(arrays["wq"][i], n_heads)
    tensors[p + "self_attn.k_proj.weight"] = _rotate_half_rows(arrays["wk"][i], n_kv)
    tensors[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
    tensors[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
    tensors[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
    tensors[p + "mlp.down_proj.weight"] = arrays["w2"][i]
    tensors[p + "mlp.up_proj.weight"] = arrays["w3"][i]
  return config, tensors


def find_llama2c_tokenizer(model_path: Path, vocab_size: int) -> Path | None:
  """A tokenizer beside a llama2.c checkpoint; SentencePiece `.model` first (it is the reference)."""
  folder = model_path.parent
  for name in (f"tok{vocab_size}.model", "tokenizer.model", f"tok{vocab_size}.bin", "tokenizer.bin"):
    if (folder / name).exists():
      return folder / name
  return None


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
  path = Path(path)
  if path.is_dir():
    return HFTokenizer(path)
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.suffix == ".bin":
    return Llama2cTokenizer(path, vocab_size)
  raise CheckpointError(f"tokenizer {path}: expected a HF directory, a SentencePiece .model or a llama2.c .bin")


def load_llama2c(path: str | Path, tokenizer_path: str | Path | None = None, dtype=jnp.float32) -> "LoadedModel":
  path = Path(path)
  config, tensors = read_llama2c(path)
  config = config.replace(dtype=dtype)
  model = params_from_tensors(config, tensors, str(path))
  tokenizer_path = tokenizer_path or find_llama2c_tokenizer(path, config.vocab_size)
  tokenizer = load_tokenizer(tokenizer_path, config.vocab_size) if tokenizer_path else None
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(path))


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
  model: Llama
  tokenizer: Tokenizer | None
  config: LlamaConfig
  source: str
  quant_config: Any = None  # cometjax.config.QuantConfig of a quantized directory, else None


def load(path: str | Path, *, tokenizer: str | Path | None = None, dtype=jnp.float32) -> LoadedModel:
  """Loads a HF model directory, a llama2.c `.bin`, or a directory written by `cometjax quantize`
  (tokenizer found beside / inside it unless given)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"model path does not exist: {path}")
  if path.is_dir() and (path / QUANTIZED_METADATA).exists():
    from cometjax.quantize import load_quantized  # quantize imports this module
    loaded = load_quantized(path)
    if tokenizer is not None:
      loaded.tokenizer = load_tokenizer(tokenizer, loaded.config.vocab_size)
    return loaded
  if path.is_dir():
    loaded = load_hf(path, dtype=dtype)
    if tokenizer is not None:
      loaded.tokenizer = load_tokenizer(tokenizer, loaded.config.vocab_size)
    return loaded
  if path.suffix == ".bin":
    return load_llama2c(path, tokenizer_path=tokenizer, dtype=dtype)
  raise CheckpointError(f"cannot tell the checkpoint format of {path}: expected a Hugging Face directory "
                        "(config.json + safetensors) or a llama2.c .bin file")
