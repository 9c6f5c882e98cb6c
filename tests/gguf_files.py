"""Tiny llama.cpp GGUF files written with the `gguf` package's own writer, for the loader and tokenizer tests:
a random Llama's tensors under llama.cpp names with its converter's Q/K row permutation, a small byte-level
BPE vocabulary with ChatML special tokens, and a chat template."""

from __future__ import annotations

import numpy as np

from cometjax.checkpoint.gguf_vocab import byte_alphabet
from cometjax.checkpoint.hf import hf_tensor_names
from cometjax.models.llama import LlamaConfig

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "Ġan d", "o n", "e r", "Ġ s", "Ġ w", "a s", "Ġw as")


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
  """(tokens, token types, merges): the 3 ChatML specials (ids 0..2, CONTROL), 256 bytes, then the merges'
  results."""
  tokens = list(SPECIALS) + [byte_alphabet()[b] for b in range(256)]
  for merge in MERGES:
    tokens.append(merge.replace(" ", ""))
  types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
  return tokens, types, list(MERGES)


def tiny_config(vocab: int, tie: bool = False) -> LlamaConfig:
  return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0, max_position_embeddings=128,
                     tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)


def random_hf_tensors(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {n: rng.normal(0, 0.15, shape).astype(np.float32) for n, (_, shape, _) in hf_tensor_names(config).items()}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """What llama.cpp's converter does to q/k rows (the inverse of cometjax.checkpoint.gguf.unpermute_rows)."""
  rows = w.shape[0]
  return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
  stem, kind = hf.rsplit(".", 1)
  if stem.startswith("model.layers."):
    _, _, i, rest = stem.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest]}.{kind}"
  return f"{_TO_GGUF[stem]}.{kind}"


def write_gguf(path, config: LlamaConfig, tensors: dict[str, np.ndarray], *, linear_type: str = "F32",
               architecture: str = "llama", tokenizer: bool = True, chat_template: str | None = CHATML,
               extra_tensors: dict | None = None, add_bos: bool = False) -> None:
  """Writes `tensors` (HF names, [out, in]) as a llama.cpp GGUF; linear weights stored as `linear_type`."""
  import gguf
  qtype = getattr(gguf.GGMLQuantizationType, linear_type)
  w = gguf.GGUFWriter(str(path), architecture)
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_dimension_count(config.resolved_head_dim)
  w.add_vocab_size(config.vocab_size)
  if tokenizer:
    tokens, types, merges = byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    if chat_template:
      w.add_chat_template(chat_template)
  heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
  for name, array in tensors.items():
    projection = name.rsplit(".", 1)[0].split(".", 3)[-1]
    if projection in heads:
      array = llamacpp_permute(array, heads[projection])
    if array.ndim == 2 and name != "model.embed_tokens.weight" and qtype != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gguf_name(name), array)
  for name, array in (extra_tensors or {}).items():
    w.add_tensor(name, array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def rewrite_gguf_metadata(source, path, key: str | None, value=None, vtype=None, architecture: str = "llama"):
  """Writes to `path` a copy of the GGUF at `source` whose metadata `key` is dropped (value None) or replaced
  by `value` of GGUFValueType `vtype`; tensors unchanged. `path` may equal `source`."""
  from pathlib import Path

  import gguf
  reader = gguf.GGUFReader(str(source))
  tmp = Path(str(path) + ".tmp")
  writer = gguf.GGUFWriter(str(tmp), architecture)
  for k, field in reader.fields.items():
    if k.startswith("GGUF.") or k in ("general.architecture", key):
      continue
    sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(k, field.contents(), field.types[0], sub)
  if value is not None:
    writer.add_key_value(key, value, vtype)
  for tensor in reader.tensors:
    writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(tuple(reversed([int(d) for d in tensor.shape]))))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tmp.replace(path)
  return Path(path)
