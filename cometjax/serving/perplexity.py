"""Perplexity on a text file with a stated, fixed protocol.

Protocol (the default, `windowing="stream"`, `per_document=False`):
1. Split the text into documents on `separator` (default `<|endoftext|>`; a file without it, such as
   WikiText-2, is one document), `strip()` each and drop empty ones.
2. Tokenize each document with the tokenizer's own BOS rule ([BOS] + tokens where the tokenizer adds BOS:
   SentencePiece / llama2.c models, Llama HF tokenizers; tokens alone where it does not: SmolLM2, GPT-2-style
   vocabularies; no EOS) and concatenate them in file order into one stream of N ids.
3. For s = 0, W, 2W, ... while s < N - 1: feed ids[s : s+W] as a fresh sequence (positions 0..) and
   score ids[s+1 : s+W+1] (the last window may be shorter). W is `window` (default 512).
4. ppl = exp(total NLL / number of scored tokens).
With `per_document=True` the same windowing runs on each document separately (the next document's BOS
is never predicted).
With `windowing="disjoint"` the windows are ids[kW : (k+1)W] for k = 0, 1, ... (full windows only), each a
fresh sequence scoring its own W - 1 next-token predictions: the WikiText-2 protocol of GPTQ and of
transformers' perplexity guide, which shares no token between windows.
`max_windows` N keeps only the first N windows (over the documents in order): for one-document text such
as WikiText-2 it picks a fixed prefix. Reference: SmolLM2-135M-Instruct (GGUF), text/wikitext2_test.raw,
no BOS, the first 40 disjoint windows of 512 tokens: 28.739 (stream windows: 28.723).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cometjax.core.kv import KVQuantConfig
from cometjax.serving.generate import forward_with_cache, round_up
from cometjax.serving.kvcache import create_cache, prefill_chunk

DEFAULT_SEPARATOR = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  ppl: float
  nll_per_token: float
  num_tokens: int  # scored (predicted) tokens
  num_windows: int
  num_documents: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def split_documents(text: str, separator: str | None = DEFAULT_SEPARATOR) -> list[str]:
  pieces = text.split(separator) if separator else [text]
  return [p.strip() for p in pieces if p.strip()]


WINDOWINGS = ("stream", "disjoint")


def windows(ids: Sequence[int], window: int, windowing: str = "stream") -> Iterable[tuple[np.ndarray, np.ndarray]]:
  """(inputs, targets) pairs. stream: inputs ids[s:s+W], targets ids[s+1:s+W+1] for s = 0, W, ... < N-1;
  disjoint: inputs ids[s:s+W-1], targets ids[s+1:s+W] for every full window ids[s:s+W]."""
  ids = np.asarray(ids, np.int32)
  if windowing == "stream":
    for s in range(0, len(ids) - 1, window):
      chunk = ids[s:s + window + 1]
      yield chunk[:-1], chunk[1:]
  elif windowing == "disjoint":
    for s in range(0, len(ids) - window + 1, window):
      chunk = ids[s:s + window]
      yield chunk[:-1], chunk[1:]
  else:
    raise ValueError(f"windowing must be one of {WINDOWINGS}, got {windowing!r}")


@functools.partial(jax.jit, static_argnames=("kv",))
def _window_nll(graphdef, state, inputs, targets, valid, kv=None):
  """Summed NLL over valid targets.  inputs, targets, valid: [B, W]; kv: the KV cache setting or None."""
  model = nnx.merge(graphdef, state)
  if kv is None:
    logits, _ = model(inputs)
  else:  # run the window through a quantized cache, as prefill would
    b, w = inputs.shape
    cache = create_cache(kv, model.config, b, round_up(w, prefill_chunk(kv)), contiguous=True)
    logits, _ = forward_with_cache(model, inputs, jnp.sum(valid, axis=1), cache)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0), axis=-1)


def perplexity_of_ids(model, streams: Sequence[Sequence[int]], *, window: int = 512, batch_size: int = 8,
                      kv: KVQuantConfig | None = None, progress: bool = True, windowing: str = "stream",
                      max_windows: int | None = None) -> tuple[float, int, int]:
  """Total NLL, scored-token count and window count over the windows of each id stream (the first
  `max_windows` of them when given)."""
  if window < 1 or (windowing == "disjoint" and window < 2):
    raise ValueError(f"window must be >= {1 if windowing == 'stream' else 2}, got {window}")
  if max_windows is not None and max_windows < 1:
    raise ValueError(f"max_windows must be None or >= 1, got {max_windows}")
  limit = model.config.max_position_embeddings
  if window > limit:
    raise ValueError(f"window ({window}) exceeds the model's max_position_embeddings ({limit})")
  pairs = [pair for ids in streams for pair in windows(ids, window, windowing)][:max_windows]
  graphdef, state = nnx.split(model)
  total, count = 0.0, 0
  bar = tqdm(total=len(pairs), desc="perplexity", unit="win", disable=not progress)
  for start in range(0, len(pairs), batch_size):
    group = pairs[start:start + batch_size]
    inputs = np.zeros((batch_size, window), np.int32)  # fixed shape: one compilation
    targets = np.zeros((batch_size, window), np.int32)
    valid = np.zeros((batch_size, window), bool)
    for row, (x, y) in enumerate(group):
      inputs[row, :len(x)], targets[row, :len(y)], valid[row, :len(y)] = x, y, True
    nll = _window_nll(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(valid), kv=kv)
    total += float(np.asarray(nll, np.float64).sum())
    count += int(valid.sum())
    bar.update(len(group))
  bar.close()
  return total, count, len(pairs)


def perplexity(model, tokenizer, text: str, *, window: int = 512, separator: str | None = DEFAULT_SEPARATOR,
               per_document: bool = False, batch_size: int = 8, max_documents: int | None = None,
               max_windows: int | None = None, windowing: str = "stream", kv: KVQuantConfig | None = None,
               progress: bool = True, skip_documents: int = 0) -> PerplexityResult:
  """Perplexity of `text` under the protocol in this module's docstring.

  With `kv` (an INT4 KV cache setting) each window runs through that cache, as prefill would: every
  query attends to the keys/values the cache returns (dequantized INT4).
  """
  if skip_documents < 0:
    raise ValueError(f"skip_documents must be >= 0, got {skip_documents}")
  docs = split_documents(text, separator)[skip_documents:]  # e.g. past the calibration documents
  if max_documents is not None:
    docs = docs[:max_documents]
  if not docs:
    raise ValueError("the text holds no non-empty document")
  encoded = [tokenizer.encode(d) for d in tqdm(docs, desc="tokenize", disable=not progress)]
  streams = encoded if per_document else [[i for ids in encoded for i in ids]]
  total, count, num_windows = perplexity_of_ids(model, streams, window=window, batch_size=batch_size, kv=kv,
                                                progress=progress, windowing=windowing, max_windows=max_windows)
  if count == 0:
    raise ValueError("no token to score: every document is a single token" if windowing == "stream" else
                     f"no token to score: no document reaches one full window of {window} tokens")
  nll = total / count
  return PerplexityResult(ppl=math.exp(nll), nll_per_token=nll, num_tokens=count, num_windows=num_windows,
                          num_documents=len(docs))
