"""Tokenizers: transformers' AutoTokenizer (HF directories), GGUF `tokenizer.ggml.*` vocabularies (built here
with the `tokenizers` library), SentencePiece `.model` files, and llama2.c's `tokenizer.bin` (read here,
encoded as its run.c does).

Every class follows one protocol (`Tokenizer`). `encode(text, bos=None)`: None applies the tokenizer's own
BOS rule (HF: whether its post-processor prepends BOS; GGUF: `tokenizer.ggml.add_bos_token`, default on for
SentencePiece vocabularies as in llama.cpp; SentencePiece and llama2.c models: on). `apply_chat_template`
renders `chat_template` as transformers does (`cometjax.checkpoint.chat_template`) and tokenizes it with no
BOS added (the template writes its own); `end_of_turn_ids` are the ids that end an assistant turn.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from cometjax.checkpoint.chat_template import end_of_turn_text, render_chat
from cometjax.checkpoint.gguf_vocab import build_tokenizer, read_tokenizer_metadata
from cometjax.checkpoint.io import gguf_metadata, open_gguf
from cometjax.errors import CheckpointError


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None
  vocab_size: int
  end_of_turn_ids: tuple[int, ...]

  def encode(self, text: str, bos: bool | None = None) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]: ...


class _ChatTemplated:
  """apply_chat_template / end_of_turn_ids from `chat_template`, `special_tokens` and `special_ids`."""
  chat_template: str | None = None
  special_tokens: dict[str, str | None] = {}
  special_ids: frozenset[int] = frozenset()

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    text = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                       special_tokens=self.special_tokens)
    return self.encode(text, bos=False)

  def _end_of_turn_ids(self) -> tuple[int, ...]:
    ids = [] if self.eos_id is None else [self.eos_id]
    suffix = end_of_turn_text(self.chat_template, self.special_tokens)
    if suffix and suffix.strip():
      first = self.encode(suffix.lstrip(), bos=False)[:1]
      if first and first[0] in self.special_ids:
        ids.insert(0, first[0])
    return tuple(dict.fromkeys(ids))


class HFTokenizer(_ChatTemplated):
  """transformers' AutoTokenizer from a local directory (offline)."""

  def __init__(self, directory: str | Path):
    from transformers import AutoTokenizer
    try:
      self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:  # transformers' errors on missing / bad files
      raise CheckpointError(f"tokenizer in {directory} cannot be read: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    self.bos_id = self._tok.bos_token_id
    self.eos_id = self._tok.eos_token_id
    self.vocab_size = len(self._tok)
    probe_with = self._tok("a", add_special_tokens=True, verbose=False).input_ids
    probe_without = self._tok("a", add_special_tokens=False, verbose=False).input_ids
    self.add_bos = (self.bos_id is not None and probe_with[:1] == [self.bos_id]
                    and probe_without[:1] != [self.bos_id])
    self.chat_template = getattr(self._tok, "chat_template", None)
    self.special_tokens = {name: getattr(self._tok, name, None)
                           for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    self.special_ids = frozenset(self._tok.all_special_ids)
    self.end_of_turn_ids = self._end_of_turn_ids()

  def encode(self, text: str, bos: bool | None = None) -> list[int]:
    ids = self._tok(text, add_special_tokens=False, verbose=False).input_ids
    bos = self.add_bos if bos is None else bos
    return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=True)


class GGUFTokenizer(_ChatTemplated):
  """The vocabulary of a GGUF file's `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`) or SentencePiece
  BPE (`llama`), built as transformers builds it from the same file (`cometjax.checkpoint.gguf_vocab`)."""

  def __init__(self, meta: dict, source: str):
    self.meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    self._tk, self.special_ids = build_tokenizer(self.meta, source)
    tokens = self.meta["tokenizer.ggml.tokens"]
    self.vocab_size = len(tokens)
    self.bos_id = self._token_id("bos", source)
    self.eos_id = self._token_id("eos", source)
    kind = self.meta["tokenizer.ggml.model"]
    self.add_bos = bool(self.meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and self.bos_id is not None
    self.chat_template = self.meta.get("tokenizer.chat_template")
    self.special_tokens = {f"{name}_token": (None if (i := self.meta.get(f"tokenizer.ggml.{key}_token_id")) is None
                                             else tokens[i])
                           for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    self.end_of_turn_ids = self._end_of_turn_ids()

  def _token_id(self, name: str, source: str) -> int | None:
    value = self.meta.get(f"tokenizer.ggml.{name}_token_id")
    if value is not None and not 0 <= int(value) < self.vocab_size:
      raise CheckpointError(f"{source}: tokenizer.ggml.{name}_token_id={value} is outside the vocabulary "
                            f"(size {self.vocab_size})")
    return None if value is None else int(value)

  def encode(self, text: str, bos: bool | None = None) -> list[int]:
    ids = self._tk.encode(text, add_special_tokens=False).ids
    bos = self.add_bos if bos is None else bos
    return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """encode(text, bos=False) of each text, in one call (the Rust tokenizer runs them in parallel)."""
    return [list(e.ids) for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tk.decode(list(ids), skip_special_tokens=True)


class SentencePieceTokenizer(_ChatTemplated):
  """A SentencePiece `.model` file (llama2.c's tok512.model, Llama-2's tokenizer.model); adds BOS."""

  add_bos = True

  def __init__(self, path: str | Path):
    import sentencepiece
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:  # sentencepiece's own parse / open failures
      raise CheckpointError(f"tokenizer {path} is not a readable SentencePiece model: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.vocab_size = self._sp.get_piece_size()
    self.end_of_turn_ids = () if self.eos_id is None else (self.eos_id,)

  def encode(self, text: str, bos: bool | None = None) -> list[int]:
    bos = self.add_bos if bos is None else bos
    return ([self.bos_id] if bos and self.bos_id is not None else []) + list(self._sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


class Llama2cTokenizer(_ChatTemplated):
  """llama2.c's `tokenizer.bin`: pieces with merge scores, encoded greedily as in its run.c; adds BOS.

  Like run.c it prepends a dummy-prefix space and does not collapse runs of spaces (so it can differ
  from SentencePiece on text with repeated spaces).
  """

  add_bos = True

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
    self.end_of_turn_ids = (self.eos_id,)
    self._index = {p: i for i, p in enumerate(pieces)}

  def encode(self, text: str, bos: bool | None = None) -> list[int]:
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
    bos = self.add_bos if bos is None else bos
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


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
  """A tokenizer from a HF directory, a GGUF file (its metadata), a SentencePiece .model, a llama2.c .bin,
  or the `tokenizer.gguf.json` a quantized directory keeps for a GGUF model."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"tokenizer {path} does not exist")
  if path.is_dir():
    return HFTokenizer(path)
  if path.suffix == ".gguf":
    return GGUFTokenizer(gguf_metadata(open_gguf(path)), str(path))
  if path.name.endswith(".gguf.json"):
    return GGUFTokenizer(read_tokenizer_metadata(path), str(path))
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.suffix == ".bin":
    return Llama2cTokenizer(path, vocab_size)
  raise CheckpointError(f"tokenizer {path}: expected a HF directory, a .gguf file, a SentencePiece .model or a "
                        "llama2.c .bin")
