"""Tokenizers: transformers' AutoTokenizer (HF directories), SentencePiece `.model` files, and llama2.c's
`tokenizer.bin` (read here, encoded as its run.c does).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Protocol

from cometjax.errors import CheckpointError


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


def load_tokenizer(path: str | Path, vocab_size: int) -> Tokenizer:
  path = Path(path)
  if path.is_dir():
    return HFTokenizer(path)
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  if path.suffix == ".bin":
    return Llama2cTokenizer(path, vocab_size)
  raise CheckpointError(f"tokenizer {path}: expected a HF directory, a SentencePiece .model or a llama2.c .bin")
