"""`load(path)`: any LLM checkpoint cometjax reads -> `LoadedModel(model, tokenizer, config, source)`."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from cometjax.checkpoint.gguf import load_gguf
from cometjax.checkpoint.hf import load_hf
from cometjax.checkpoint.llama2c import load_llama2c
from cometjax.checkpoint.loaded import LoadedModel
from cometjax.checkpoint.quantized import METADATA_FILE, load_quantized
from cometjax.checkpoint.tokenizers import load_tokenizer
from cometjax.errors import CheckpointError


def load(path: str | Path, *, tokenizer: str | Path | None = None, dtype=jnp.float32) -> LoadedModel:
  """Loads a Hugging Face model directory, a llama.cpp `.gguf` file (tokenizer from its metadata), a llama2.c
  `.bin`, or a directory written by `cometjax quantize` (the tokenizer is found beside / inside it unless
  given)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"model path does not exist: {path}")
  if path.is_dir() and (path / METADATA_FILE).exists():
    loaded = load_quantized(path)
  elif path.is_dir():
    loaded = load_hf(path, dtype=dtype)
  elif path.suffix == ".bin":
    return load_llama2c(path, tokenizer_path=tokenizer, dtype=dtype)
  elif path.suffix == ".gguf":
    loaded = load_gguf(path, dtype=dtype)
  else:
    raise CheckpointError(f"cannot tell the checkpoint format of {path}: expected a Hugging Face directory "
                          "(config.json + safetensors), a directory written by `cometjax quantize`, a "
                          "llama.cpp .gguf file or a llama2.c .bin file")
  if tokenizer is not None:
    loaded.tokenizer = load_tokenizer(tokenizer, loaded.config.vocab_size)
  return loaded
