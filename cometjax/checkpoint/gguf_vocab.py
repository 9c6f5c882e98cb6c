"""A `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata, built the way transformers builds one
from the same file, and the JSON file a quantized directory keeps that metadata in.

- `gpt2` (byte-level BPE): the file's tokens (in GPT-2's byte alphabet) and merges; the pre-tokenizer is
  GPT-2's byte-level regex, or the split regex of `tokenizer.ggml.pre` where that names the Llama-3 one.
- `llama` (SentencePiece BPE): the file's tokens with byte fallback, merges from the file or, when it lists
  none, derived from the vocabulary ranked by the merged piece's score (SentencePiece's merge order); a
  leading U+2581 is prepended to the text (`tokenizer.ggml.add_space_prefix`, default on).
Tokens typed CONTROL (3) become special added tokens and USER_DEFINED (4) plain added tokens, so the text
`<|im_start|>` maps to its id instead of being split.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from cometjax.errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4
SUPPORTED_MODELS = ("gpt2", "llama")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
TOKENIZER_FILE = "tokenizer.gguf.json"


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
  """GPT-2's printable spelling of each byte: printable Latin-1 bytes as themselves, the rest mapped to
  code points 256 and up, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  spelling, extra = {}, 0
  for b in range(256):
    if b in printable:
      spelling[b] = chr(b)
    else:
      spelling[b] = chr(256 + extra)
      extra += 1
  return spelling


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
  """SentencePiece BPE merges implied by a vocabulary: every split of a piece into two pieces, ranked by the
  merged piece's score (highest first), ties by the left then the right part's length (longest first)."""
  index = {t: i for i, t in enumerate(tokens)}
  candidates = []
  for token, score in zip(tokens, scores):
    local = [(token[:k], token[k:], score) for k in range(1, len(token))
             if token[:k] in index and token[k:] in index]
    local.sort(key=lambda m: (index[m[0]], index[m[1]]))
    candidates.extend(local)
  candidates.sort(key=lambda m: (-m[2], -len(m[0]), -len(m[1])))
  return [(left, right) for left, right, _ in candidates]


def _byte_level(meta: dict):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  spelling = byte_alphabet()
  alphabet = set(spelling.values())
  vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
  merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
  tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
  if meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE:
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  return tk, alphabet


def _sentencepiece(meta: dict, source: str):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  tokens = meta["tokenizer.ggml.tokens"]
  if "tokenizer.ggml.merges" in meta:
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  elif "tokenizer.ggml.scores" in meta:
    merges = spm_merges(tokens, meta["tokenizer.ggml.scores"])
  else:
    raise CheckpointError(f"{source}: a SentencePiece (llama) vocabulary needs tokenizer.ggml.merges or "
                          "tokenizer.ggml.scores; the file has neither")
  vocab = {t: i for i, t in enumerate(tokens)}
  tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                              split=False)
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(content=" ", left=1))
  tk.decoder = decoders.Sequence(steps)
  return tk, None


def _check_fields(meta: dict, kind: str, source: str) -> None:
  """The tokenizer metadata's lists hold what they must, one entry per token (a byte-level vocabulary needs
  its merges: without them every word would split into bytes, silently)."""
  tokens = meta["tokenizer.ggml.tokens"]
  if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
    raise CheckpointError(f"{source}: metadata tokenizer.ggml.tokens must be a non-empty list of strings")
  if kind == "gpt2" and "tokenizer.ggml.merges" not in meta:
    raise CheckpointError(f"{source}: metadata key 'tokenizer.ggml.merges' is missing (a gpt2 vocabulary needs it)")
  for key, kind_ok, what in (("tokenizer.ggml.merges", lambda v: isinstance(v, str), "strings"),
                             ("tokenizer.ggml.token_type", lambda v: isinstance(v, int), "integers"),
                             ("tokenizer.ggml.scores", lambda v: isinstance(v, (int, float)), "numbers")):
    value = meta.get(key)
    if value is None:
      continue
    if not isinstance(value, list) or not all(kind_ok(v) for v in value):
      raise CheckpointError(f"{source}: metadata {key} must be a list of {what}")
    if key != "tokenizer.ggml.merges" and len(value) != len(tokens):
      raise CheckpointError(f"{source}: metadata {key} has {len(value)} entries, tokenizer.ggml.tokens {len(tokens)}")
  template = meta.get("tokenizer.chat_template")
  if template is not None and not isinstance(template, str):
    raise CheckpointError(f"{source}: metadata tokenizer.chat_template must be a string, got {type(template).__name__}")


def build_tokenizer(meta: dict, source: str):
  """(tokenizers.Tokenizer, frozenset of special token ids) for GGUF tokenizer metadata."""
  from tokenizers import AddedToken
  kind = meta.get("tokenizer.ggml.model")
  if kind not in SUPPORTED_MODELS:
    raise CheckpointError(f"{source}: tokenizer.ggml.model={kind!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODELS)})")
  if "tokenizer.ggml.tokens" not in meta:
    raise CheckpointError(f"{source}: metadata key 'tokenizer.ggml.tokens' is missing")
  _check_fields(meta, kind, source)
  tk, alphabet = _byte_level(meta) if kind == "gpt2" else _sentencepiece(meta, source)
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  # a byte-level vocabulary spells every real token in its alphabet: a "control" token outside it is a
  # converter mislabel, and adding it would grow the vocabulary past the model's
  control = [t for t, k in zip(tokens, types) if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
  tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
  vocab = tk.get_vocab()
  user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
  tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  special_ids = frozenset(vocab[t] for t in control if t in vocab)
  return tk, special_ids


def write_tokenizer_metadata(path: Path, meta: dict) -> None:
  """The `tokenizer.*` metadata of a GGUF file as JSON (what `GGUFTokenizer` needs, without the weights)."""
  Path(path).write_text(json.dumps({k: v for k, v in meta.items() if k.startswith("tokenizer.")}))


def read_tokenizer_metadata(path: Path) -> dict:
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"tokenizer file {path} is missing")
  try:
    meta = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"tokenizer file {path} is not valid JSON: {e}") from e
  if not isinstance(meta, dict) or "tokenizer.ggml.model" not in meta:
    raise CheckpointError(f"tokenizer file {path} lacks tokenizer.ggml.model (not written by cometjax?)")
  return meta
