"""llama.cpp GGUF files (`general.architecture = llama`): metadata -> `LlamaConfig`, tensors dequantized
with the ggml project's own `gguf` package, llama.cpp's Q/K row permutation undone -> the Flax model, and
the tokenizer from the `tokenizer.ggml.*` metadata (`cometjax.checkpoint.tokenizers.GGUFTokenizer`).

GGUF stores a matrix with ggml's shape order (ne0 = columns first); `gguf.GGUFReader` exposes the data
rows-first, so a dequantized tensor is [out, in] like a Hugging Face weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from cometjax.checkpoint.hf import params_from_tensors
from cometjax.checkpoint.io import gguf_metadata, open_gguf
from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.tokenizers import GGUFTokenizer
from cometjax.checkpoint.validation import build, check_model_config
from cometjax.errors import CheckpointError
from cometjax.models.llama import LlamaConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _required(meta: dict, key: str, source: str):
  if key not in meta:
    raise CheckpointError(f"{source}: metadata key {key!r} is missing")
  return meta[key]


def _uniform(value, key: str, source: str) -> int:
  """A per-layer array metadata value (llama.cpp allows one) must be uniform here."""
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise CheckpointError(f"{source}: metadata {key} varies per layer ({sorted(set(value))}); "
                            "per-layer head counts are not implemented")
    value = value[0]
  return int(value)


def _f32_value(value) -> float:
  """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
  return float(f"{float(value):.7g}")


def _rope_scaling(meta: dict, arch: str, source: str) -> RopeScaling | None:
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind == "linear":
    return RopeScaling(rope_type="linear", factor=float(_required(meta, f"{arch}.rope.scaling.factor", source)))
  raise CheckpointError(f"{source}: metadata {arch}.rope.scaling.type={kind!r} is not implemented "
                        "(supported: none, linear)")


def config_from_gguf(meta: dict, tensor_names: set[str], source: str, dtype=jnp.float32) -> LlamaConfig:
  """Our `LlamaConfig` from GGUF metadata; unsupported architectures and features raise CheckpointError."""
  arch = _required(meta, "general.architecture", source)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"{source}: general.architecture={arch!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
  if "rope_freqs.weight" in tensor_names:
    raise CheckpointError(f"{source}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, llama3-style "
                          "scaling as llama.cpp stores it) is not implemented")
  hidden = int(_required(meta, f"{arch}.embedding_length", source))
  heads = _uniform(_required(meta, f"{arch}.attention.head_count", source), "head_count", source)
  kv_heads = _uniform(meta.get(f"{arch}.attention.head_count_kv", heads), "head_count_kv", source)
  head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
  rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise CheckpointError(f"{source}: metadata {arch}.rope.dimension_count={rope_dims} differs from head_dim "
                          f"{head_dim} (partial rotary embeddings are not implemented)")
  vocab = meta.get(f"{arch}.vocab_size")
  if vocab is None:
    vocab = len(_required(meta, "tokenizer.ggml.tokens", source))
  layer0 = {n.split(".", 2)[2] for n in tensor_names if n.startswith("blk.0.")}
  qkv_bias, o_bias = "attn_q.bias" in layer0, "attn_output.bias" in layer0
  eos = meta.get("tokenizer.ggml.eos_token_id")
  bos = meta.get("tokenizer.ggml.bos_token_id")
  return LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(_required(meta, f"{arch}.feed_forward_length", source)),
      num_layers=int(_required(meta, f"{arch}.block_count", source)), num_heads=heads, num_kv_heads=kv_heads,
      head_dim=None if head_dim * heads == hidden else head_dim,
      rms_norm_eps=_f32_value(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=_f32_value(meta.get(f"{arch}.rope.freq_base", 10000.0)),
      rope_scaling=_rope_scaling(meta, arch, source),
      max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
      tie_word_embeddings="output.weight" not in tensor_names, qkv_bias=qkv_bias, o_bias=o_bias,
      mlp_bias="ffn_up.bias" in layer0, bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos), model_type="llama", dtype=dtype)


def hf_name(gguf_name: str, source: str) -> str:
  """The Hugging Face tensor name of a llama.cpp one ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")."""
  stem, _, kind = gguf_name.rpartition(".")
  parts = stem.split(".")
  if kind in ("weight", "bias"):
    if len(parts) == 1 and parts[0] in _GLOBAL_TENSORS:
      return f"{_GLOBAL_TENSORS[parts[0]]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
      return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
  raise CheckpointError(f"{source}: tensor {gguf_name!r} is not part of the llama architecture as implemented "
                        "here (an unsupported feature, or a file of another architecture)")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (its converter interleaves each head's rotate_half halves)."""
  rows = w.shape[0]
  rest = w.shape[1:]
  return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor, source: str) -> np.ndarray:
  """float32 array of one GGUF tensor; a type the `gguf` package cannot dequantize raises, naming it."""
  from gguf import GGMLQuantizationType
  from gguf.quants import dequantize
  qtype = tensor.tensor_type
  if qtype == GGMLQuantizationType.F64:
    return np.asarray(tensor.data, np.float32)
  if qtype in (GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
               GGMLQuantizationType.I64):
    raise CheckpointError(f"{source}: tensor {tensor.name!r} has integer type {qtype.name}, expected a float "
                          "or quantized float type")
  try:
    array = dequantize(tensor.data, qtype)
  except NotImplementedError as e:
    raise CheckpointError(f"{source}: tensor {tensor.name!r} has type {qtype.name}, which the gguf package "
                          f"cannot dequantize ({e})") from None
  shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml order (ne0 = columns) -> rows first
  return np.asarray(array, np.float32).reshape(shape)


def read_gguf(path: str | Path, dtype=jnp.float32) -> tuple[LlamaConfig, dict[str, np.ndarray], dict]:
  """(config, HF-named float32 tensors with q/k rows in the rotate_half layout, metadata) of a GGUF file."""
  source = str(path)
  reader = open_gguf(path)
  meta = gguf_metadata(reader)
  names = {t.name for t in reader.tensors}
  config = build(lambda: config_from_gguf(meta, names, source, dtype=dtype), source, "(metadata)")
  check_model_config(config, source)
  heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
  tensors = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name, source)
    array = build(lambda: dequantize_tensor(tensor, source), source, f"tensor {tensor.name!r}")
    projection = name.rsplit(".", 1)[0].split(".", 3)[-1]
    if projection in heads:
      array = unpermute_rows(array, heads[projection])
    tensors[name] = array
  return config, tensors, meta


def load_gguf(path: str | Path, dtype=jnp.float32) -> LoadedModel:
  path = Path(path)
  config, tensors, meta = read_gguf(path, dtype=dtype)
  model = params_from_tensors(config, tensors, str(path))
  tokenizer = None
  if "tokenizer.ggml.model" in meta:
    try:
      tokenizer = GGUFTokenizer(meta, str(path))
    except CheckpointError:
      raise
    except Exception as e:  # the tokenizers library raises bare Exceptions on an inconsistent vocabulary
      raise CheckpointError(f"{path}: the tokenizer.ggml.* metadata does not build a tokenizer: "
                            f"{type(e).__name__}: {e}") from None
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(path))
