"""Continuous batching: requests join and leave a fixed-size batch of slots between decode steps.

Each `step()`:
1. admits waiting requests into free slots (their slot's cache rows are reset);
2. runs one prefill chunk (`chunk` tokens) for every slot still prefilling its prompt;
3. runs one decode step for every slot that has finished its prompt;
4. emits `TokenEvent`s (streaming) and frees the slots of finished requests.
Both steps are jitted once for the engine's fixed shapes ([slots, chunk] and [slots, 1]); a slot that
takes no part in a step gets positions past the cache end, which the cache drops, so requests coming
and going never recompile. Each request carries its own sampling setting and seed, passed to the steps as
per-slot arrays (a new setting never recompiles either); its n-th token is drawn with the key
fold_in(key(seed), n), so a seeded request gives the same tokens whatever else shares the batch.
Greedy outputs equal `cometjax.serving.generate.generate` on the same prompts.

The engine is not thread-safe: one thread owns it (see `cometjax.serving.engine_thread`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.core.kv import KVQuantConfig
from cometjax.errors import InputError
from cometjax.serving.generate import SamplingConfig, sample_logits_rows
from cometjax.serving.kvcache import create_cache, prefill_chunk
from cometjax.serving.limits import check_token_ids, fit_context

TRACE_COUNTS = {"prefill": 0, "decode": 0}


FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  request_id: int
  token: int
  finished: bool
  finish_reason: str | None = None  # on the last event: "stop" (an end token) or "length" (max_new_tokens)


@dataclasses.dataclass
class _Request:
  request_id: int
  prompt: list[int]
  max_new_tokens: int
  sampling: SamplingConfig
  seed: int
  stop_ids: frozenset[int]
  prefilled: int = 0  # prompt tokens already written to the cache
  generated: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Static:
  graphdef: nnx.GraphDef


def _sample(logits, rows):
  """logits [slots, V]; rows: per-slot (temperature, top_k, top_p, seed, count) arrays -> ids [slots]."""
  temperature, top_k, top_p, seeds, counts = rows
  keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(seeds, counts)
  return sample_logits_rows(logits, keys, temperature, top_k, top_p)


def _prefill_step(static, state, cache, tokens, positions, last_index, rows):
  """tokens, positions: [slots, chunk]; returns a sampled token per slot (from last_index) and the cache."""
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(static.graphdef, state)
  logits, cache = model(tokens, positions=positions, cache=cache)
  last = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]
  return _sample(last.astype(jnp.float32), rows), cache


def _decode_step(static, state, cache, tokens, positions, rows):
  """tokens, positions: [slots] -> next token per slot and the cache."""
  TRACE_COUNTS["decode"] += 1
  model = nnx.merge(static.graphdef, state)
  logits, cache = model(tokens[:, None], positions=positions[:, None], cache=cache)
  return _sample(logits[:, 0].astype(jnp.float32), rows), cache


class Engine:
  """A continuous-batching server loop over `slots` sequences of at most `max_len` tokens each."""

  def __init__(self, model, *, slots: int = 8, max_len: int = 512, chunk: int = 32,
               sampling: SamplingConfig = SamplingConfig(), kv: KVQuantConfig | None = None,
               num_pages: int | None = None, key: jax.Array | None = None, eos_ids: Sequence[int] | None = None):
    """`sampling` is the setting of requests submitted without their own; `key` seeds the requests
    submitted without a seed. `num_pages` (INT4 caches only) sizes a shared page pool smaller than
    slots * max_len: a request reserves ceil((prompt + max_new_tokens) / page_size) pages when admitted
    and returns them when done; requests wait while the pool is short."""
    group = prefill_chunk(kv)
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    if chunk < 1 or chunk % group:
      raise ValueError(f"chunk must be a positive multiple of the cache's prefill group ({group}), got {chunk}")
    if max_len % chunk:
      raise ValueError(f"max_len ({max_len}) must be a multiple of chunk ({chunk})")
    if not sampling.greedy and key is None:
      raise ValueError("key (a jax.random key) is required when sampling with temperature > 0")
    self.model = model
    self.slots, self.max_len, self.chunk, self.kv = slots, max_len, chunk, kv
    self.sampling = sampling
    self.eos_ids = frozenset(model.config.eos_token_ids if eos_ids is None else eos_ids)
    graphdef, self._state = nnx.split(model)
    self._static = _Static(graphdef)
    paging = {} if num_pages is None else {"num_pages": num_pages}
    self._cache = create_cache(kv, model.config, slots, max_len, **paging)
    self._paged = kv is not None
    if self._paged:
      self._page_size = self._cache.page_size
      self._free_pages = list(range(self._cache.num_pages))
      self._page_table = np.full(self._cache.page_table.shape, -1, np.int32)
      self._cache = self._cache.with_page_table(self._page_table)
    key = jax.random.key(0) if key is None else key
    self._seeds = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    self._waiting: collections.deque[_Request] = collections.deque()
    self._active: list[_Request | None] = [None] * slots
    self._next_id = 0
    self._prefill = jax.jit(_prefill_step, static_argnums=0)
    self._decode = jax.jit(_decode_step, static_argnums=0)

  def submit(self, prompt: Sequence[int], max_new_tokens: int, *, sampling: SamplingConfig | None = None,
             seed: int | None = None, stop_ids: Sequence[int] = ()) -> int:
    """Queues a request; returns its id. The prompt must be non-empty (start from [bos_id]).

    `sampling` defaults to the engine's; `seed` (0 <= seed < 2**32) fixes the request's random draws (by
    default one is drawn from the engine's key); `stop_ids` end this request as the engine's eos_ids do.
    """
    if not prompt:
      raise ValueError("prompt must hold at least one token id (start from [bos_id])")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > self.max_len:
      raise InputError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                       f"max_len ({self.max_len})")
    check_token_ids(prompt, self.model.config.vocab_size)
    fit_context(prompt, max_new_tokens, self.model.config.max_position_embeddings)
    if self._paged and self.pages_needed(len(prompt), max_new_tokens) > self._cache.num_pages:
      raise ValueError(f"the request needs {self.pages_needed(len(prompt), max_new_tokens)} pages, more than "
                       f"the pool's num_pages ({self._cache.num_pages})")
    if seed is None:
      seed = int(self._seeds.integers(0, 2**32))
    elif not 0 <= seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    request = _Request(self._next_id, list(prompt), max_new_tokens, sampling or self.sampling, seed,
                       frozenset(stop_ids))
    self._next_id += 1
    self._waiting.append(request)
    return request.request_id

  def cancel(self, request_id: int) -> bool:
    """Drops a waiting or running request, freeing its slot and pages; False when it is not here (done)."""
    for request in self._waiting:
      if request.request_id == request_id:
        self._waiting.remove(request)
        return True
    for slot, request in enumerate(self._active):
      if request is not None and request.request_id == request_id:
        self._release(slot)
        return True
    return False

  @property
  def busy(self) -> bool:
    return bool(self._waiting) or any(r is not None for r in self._active)

  @property
  def active_requests(self) -> int:
    return sum(r is not None for r in self._active)

  @property
  def waiting_requests(self) -> int:
    return len(self._waiting)

  def pages_needed(self, prompt_tokens: int, max_new_tokens: int) -> int:
    """Pages a request reserves in the INT4 cache's pool (0 for a float cache)."""
    return -(-(prompt_tokens + max_new_tokens) // self._page_size) if self._paged else 0

  @property
  def max_request_tokens(self) -> int:
    """The most prompt + new tokens one request may hold: max_len, or less when the page pool or the model's
    context (max_position_embeddings) is smaller."""
    capacity = min(self.max_len, self._cache.num_pages * self._page_size) if self._paged else self.max_len
    return min(capacity, self.model.config.max_position_embeddings)

  @property
  def num_pages(self) -> int | None:
    return self._cache.num_pages if self._paged else None

  def _admit(self):
    free = [i for i, r in enumerate(self._active) if r is None]
    admitted = np.zeros(self.slots, bool)
    while free and self._waiting:
      request = self._waiting[0]
      if self._paged:  # first come, first served: the head of the queue waits for pages
        needed = self.pages_needed(len(request.prompt), request.max_new_tokens)
        if needed > len(self._free_pages):
          break
        self._page_table[free[0], :needed] = [self._free_pages.pop() for _ in range(needed)]
      slot = free.pop(0)
      self._active[slot] = self._waiting.popleft()
      admitted[slot] = True
    if admitted.any():
      self._cache = self._cache.reset_rows(jnp.asarray(admitted))
      if self._paged:
        self._cache = self._cache.with_page_table(self._page_table)

  @property
  def free_pages(self) -> int | None:
    return len(self._free_pages) if self._paged else None

  def _rows(self):
    """The per-slot sampling arrays of the running requests (idle slots: greedy, unused)."""
    temperature = np.zeros(self.slots, np.float32)
    top_k = np.zeros(self.slots, np.int32)
    top_p = np.ones(self.slots, np.float32)
    seeds = np.zeros(self.slots, np.uint32)
    counts = np.zeros(self.slots, np.int32)
    for i, r in enumerate(self._active):
      if r is not None:
        temperature[i], top_p[i] = r.sampling.temperature, r.sampling.top_p
        top_k[i] = min(r.sampling.top_k, self.model.config.vocab_size)
        seeds[i], counts[i] = r.seed, len(r.generated)
    return tuple(jnp.asarray(a) for a in (temperature, top_k, top_p, seeds, counts))

  def step(self) -> list[TokenEvent]:
    """One scheduling step; returns the tokens produced in it."""
    self._admit()
    events: list[TokenEvent] = []
    prefilling = [i for i, r in enumerate(self._active) if r is not None and r.prefilled < len(r.prompt)]
    if prefilling:
      tokens = np.zeros((self.slots, self.chunk), np.int32)
      positions = np.full((self.slots, self.chunk), self.max_len, np.int32)
      last_index = np.zeros(self.slots, np.int32)
      for i in prefilling:
        r = self._active[i]
        piece = r.prompt[r.prefilled:r.prefilled + self.chunk]
        tokens[i, :len(piece)] = piece
        positions[i, :len(piece)] = np.arange(r.prefilled, r.prefilled + len(piece))
        last_index[i] = len(piece) - 1
      sampled, self._cache = self._prefill(self._static, self._state, self._cache, jnp.asarray(tokens),
                                           jnp.asarray(positions), jnp.asarray(last_index), self._rows())
      sampled = np.asarray(sampled)
      for i in prefilling:
        r = self._active[i]
        r.prefilled = min(len(r.prompt), r.prefilled + self.chunk)
        if r.prefilled == len(r.prompt):  # the prompt is in: its last logits give the first token
          events.append(self._emit(i, int(sampled[i])))
    decoding = [i for i, r in enumerate(self._active)
                if r is not None and r.prefilled == len(r.prompt) and r.generated and i not in prefilling]
    if decoding:
      tokens = np.zeros(self.slots, np.int32)
      positions = np.full(self.slots, self.max_len, np.int32)
      for i in decoding:
        r = self._active[i]
        tokens[i] = r.generated[-1]
        positions[i] = len(r.prompt) + len(r.generated) - 1
      sampled, self._cache = self._decode(self._static, self._state, self._cache, jnp.asarray(tokens),
                                          jnp.asarray(positions), self._rows())
      sampled = np.asarray(sampled)
      for i in decoding:
        events.append(self._emit(i, int(sampled[i])))
    return events

  def _emit(self, slot: int, token: int) -> TokenEvent:
    r = self._active[slot]
    r.generated.append(token)
    reason = None
    if token in self.eos_ids or token in r.stop_ids:
      reason = "stop"
    elif len(r.generated) >= r.max_new_tokens:
      reason = "length"
    if reason is not None:
      self._release(slot)
    return TokenEvent(r.request_id, token, reason is not None, reason)

  def _release(self, slot: int):
    self._active[slot] = None
    if self._paged:
      row = self._page_table[slot]
      self._free_pages.extend(int(p) for p in row[row >= 0])
      row[:] = -1

  def stream(self) -> Iterator[TokenEvent]:
    """Runs steps until every submitted request has finished, yielding tokens as they come."""
    while self.busy:
      yield from self.step()

  def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Submits the prompts, runs to completion, returns the generated ids per prompt (in order)."""
    ids = [self.submit(p, max_new_tokens) for p in prompts]
    outputs: dict[int, list[int]] = {i: [] for i in ids}
    for event in self.stream():
      if event.request_id in outputs:
        outputs[event.request_id].append(event.token)
    return [outputs[i] for i in ids]
