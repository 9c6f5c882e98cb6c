"""Checks at the entry of `generate` and `Engine.submit`: prompt token ids inside the vocabulary, prompt +
max_new_tokens inside the model's context, or the prompt truncated when the caller asked for it."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cometjax.errors import InputError

TRUNCATIONS = ("left",)  # "left": drop the oldest prompt tokens so the request fits


def check_token_ids(prompt: Sequence[int], vocab_size: int, what: str = "prompt") -> None:
  """Every id an integer in [0, vocab_size) (a negative id would silently index from the end)."""
  ids = np.asarray(prompt)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise InputError(f"{what} token ids must be integers, got dtype {ids.dtype}")
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise InputError(f"{what} token id {int(bad[0])} is outside [0, vocab_size) = [0, {vocab_size})")


def fit_context(prompt: Sequence[int], max_new_tokens: int, context: int, *, truncate: str | None = None,
                what: str = "prompt", limit_name: str = "the model's context") -> list[int]:
  """The prompt, unchanged when len(prompt) + max_new_tokens <= context; else an InputError, or with
  truncate="left" its last context - max_new_tokens tokens."""
  if truncate not in (None,) + TRUNCATIONS:
    raise InputError(f"truncate must be None or one of {TRUNCATIONS}, got {truncate!r}")
  if max_new_tokens >= context:
    raise InputError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in {limit_name} "
                     f"({context} tokens)")
  if len(prompt) + max_new_tokens <= context:
    return list(prompt)
  if truncate is None:
    raise InputError(f"{what} ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds {limit_name} "
                     f"({context} tokens); shorten it, lower max_new_tokens, or truncate='left' to drop the "
                     "oldest prompt tokens")
  return list(prompt)[len(prompt) + max_new_tokens - context:]


def check_request(config, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  truncate: str | None = None) -> list[list[int]]:
  """The prompts, each checked (ids, context) and truncated when asked; `config` is the model's LlamaConfig."""
  out = []
  for i, prompt in enumerate(prompts):
    what = "prompt" if len(prompts) == 1 else f"prompt {i}"
    check_token_ids(prompt, config.vocab_size, what)
    out.append(fit_context(prompt, max_new_tokens, config.max_position_embeddings, truncate=truncate, what=what))
  return out
