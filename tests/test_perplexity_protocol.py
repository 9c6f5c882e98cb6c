"""The perplexity windowing (stream / disjoint, max_windows) and the tokenizer-owned BOS rule, on a tiny model."""

import math

import jax
import numpy as np
import pytest

from cometjax.models.llama import TINY_CONFIG, init_llama
from cometjax.serving.perplexity import WINDOWINGS, perplexity, perplexity_of_ids, windows


class CharTokenizer:
  """One id per character; BOS only where the tokenizer's own rule says so."""
  bos_id, eos_id, vocab_size = 1, 2, 512

  def __init__(self, add_bos):
    self.add_bos = add_bos

  def encode(self, text, bos=None):
    bos = self.add_bos if bos is None else bos
    return ([1] if bos else []) + [3 + ord(c) % 200 for c in text]


@pytest.fixture(scope="module")
def model():
  return init_llama(TINY_CONFIG.replace(num_layers=1, max_position_embeddings=64), seed=0)


def test_window_layouts():
  ids = list(range(10))
  stream = [(list(x), list(y)) for x, y in windows(ids, 4)]
  assert stream == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8]), ([8], [9])]
  disjoint = [(list(x), list(y)) for x, y in windows(ids, 4, "disjoint")]
  assert disjoint == [([0, 1, 2], [1, 2, 3]), ([4, 5, 6], [5, 6, 7])]  # full windows only, no shared token
  with pytest.raises(ValueError, match="windowing must be one of"):
    list(windows(ids, 4, "sliding"))


def test_max_windows_scores_a_prefix(model):
  ids = list(np.random.default_rng(0).integers(3, 500, 200))
  nll_all, count_all, n_all = perplexity_of_ids(model, [ids], window=16, progress=False, windowing="disjoint")
  nll_3, count_3, n_3 = perplexity_of_ids(model, [ids], window=16, progress=False, windowing="disjoint",
                                          max_windows=3)
  nll_first, count_first, _ = perplexity_of_ids(model, [ids[:48]], window=16, progress=False, windowing="disjoint")
  assert (n_all, n_3, count_3) == (12, 3, 45) and count_all == 12 * 15
  assert math.isclose(nll_3, nll_first, rel_tol=1e-6) and count_3 == count_first
  with pytest.raises(ValueError, match="max_windows must be None or >= 1"):
    perplexity_of_ids(model, [ids], window=16, max_windows=0, progress=False)


def test_bos_follows_the_tokenizer(model):
  text = "one story<|endoftext|>another story"
  with_bos = perplexity(model, CharTokenizer(True), text, window=8, progress=False)
  without = perplexity(model, CharTokenizer(False), text, window=8, progress=False)
  assert with_bos.num_tokens == len("one story") + len("another story") + 1  # 2 BOS in the stream, first not scored
  assert without.num_tokens == len("one story") + len("another story") - 1
  assert with_bos.ppl != without.ppl


def test_one_document_text_without_a_full_window_is_refused(model):
  with pytest.raises(ValueError, match="no document reaches one full window of 64"):
    perplexity(model, CharTokenizer(False), "short", window=64, windowing="disjoint", progress=False)


def test_cli_choices_match_the_library():
  from cometjax.cli import eval_ppl
  assert eval_ppl.WINDOWINGS == WINDOWINGS


def test_skip_documents_drops_the_first_documents(model):
  tokenizer = CharTokenizer(add_bos=True)
  docs = ["one story here", "a second one", "and a third story", "fourth"]
  text = "<|endoftext|>".join(docs)
  skipped = perplexity(model, tokenizer, text, window=16, skip_documents=2, progress=False)
  rest = perplexity(model, tokenizer, "<|endoftext|>".join(docs[2:]), window=16, progress=False)
  assert skipped.num_documents == 2 and math.isclose(skipped.ppl, rest.ppl, rel_tol=1e-6)
  assert not math.isclose(skipped.ppl, perplexity(model, tokenizer, text, window=16, progress=False).ppl)
  with pytest.raises(ValueError, match="skip_documents"):
    perplexity(model, tokenizer, text, skip_documents=-1, progress=False)
