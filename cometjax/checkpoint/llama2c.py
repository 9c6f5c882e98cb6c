"""llama2.c's legacy v0 `.bin` checkpoints (header + fp32 arrays), with the tokenizer found beside them."""

from __future__ import annotations

import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cometjax.checkpoint.hf import params_from_tensors
from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.tokenizers import load_tokenizer
from cometjax.checkpoint.validation import build, check_model_config
from cometjax.errors import CheckpointError
from cometjax.models.llama import LlamaConfig


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
  if (len(raw) - 28) % 4:
    raise CheckpointError(f"{path}: {len(raw) - 28} bytes after the header is not a whole number of float32 "
                          "values (truncated?)")
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
  config = build(lambda: LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=n_layers,
                       num_heads=n_heads, num_kv_heads=n_kv, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=seq_len, tie_word_embeddings=shared, bos_token_id=1,
                       eos_token_id=2, model_type="llama"), str(path), "header")
  check_model_config(config, str(path))
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


def load_llama2c(path: str | Path, tokenizer_path: str | Path | None = None, dtype=jnp.float32) -> LoadedModel:
  path = Path(path)
  config, tensors = read_llama2c(path)
  config = config.replace(dtype=dtype)
  model = params_from_tensors(config, tensors, str(path))
  tokenizer_path = tokenizer_path or find_llama2c_tokenizer(path, config.vocab_size)
  tokenizer = load_tokenizer(tokenizer_path, config.vocab_size) if tokenizer_path else None
  return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(path))
