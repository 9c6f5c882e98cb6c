"""Token ids -> text one token at a time, with stop strings, for streaming responses.

Decoding a single token alone loses what depends on its neighbours (SentencePiece drops the leading
space of the first piece; a multi-byte character can span tokens), so each new token is decoded together
with the few tokens before it and only the text past theirs is released (the offsets scheme of
Hugging Face's text-generation-inference). Text that ends in an incomplete character (U+FFFD), or that
could be the start of a stop string, is held back until the next token settles it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

_CONTEXT_TOKENS = 6  # prompt tokens decoded before the first generated one


class IncrementalDecoder:
  """`push(token)` returns the text now safe to send; `flush()` the rest at the end. After a stop string
  matches, `stopped` is True, the text ends before it, and further pushes return ''."""

  def __init__(self, tokenizer, prompt: Sequence[int], *, stop: Sequence[str] = (), skip_ids: Iterable[int] = ()):
    self._tokenizer = tokenizer
    self._ids = list(prompt[-_CONTEXT_TOKENS:])
    self._prefix_offset = 0
    self._read_offset = len(self._ids)
    self._stop = tuple(s for s in stop if s)
    self._skip = frozenset(skip_ids)
    self.text = ""  # all text produced so far (cut before a stop string)
    self._sent = 0  # characters of self.text released
    self.stopped = False

  def push(self, token: int) -> str:
    if self.stopped or token in self._skip:
      return ""
    self._ids.append(token)
    before = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset])
    after = self._tokenizer.decode(self._ids[self._prefix_offset:])
    if len(after) <= len(before) or after.endswith("\ufffd"):
      return ""  # no new complete character yet
    delta = after[len(before):]
    self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
    search_from = max(0, len(self.text) - max((len(s) for s in self._stop), default=0) + 1)
    self.text += delta
    cut = min((i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0), default=-1)
    if cut >= 0:
      self.text, self.stopped = self.text[:cut], True
      return self._release(len(self.text))
    return self._release(len(self.text) - self._partial_stop_length())

  def flush(self) -> str:
    return self._release(len(self.text))

  def _partial_stop_length(self) -> int:
    """The longest end of self.text that begins some stop string (held back: it may complete)."""
    longest = 0
    for s in self._stop:
      for n in range(min(len(s) - 1, len(self.text)), longest, -1):
        if self.text.endswith(s[:n]):
          longest = n
          break
    return longest

  def _release(self, end: int) -> str:
    end = max(end, self._sent)
    piece, self._sent = self.text[self._sent:end], end
    return piece
