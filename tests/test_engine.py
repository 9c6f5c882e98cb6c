import numpy as np
import pytest

from cometjax.core.kv_config import KVQuantConfig
from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.serving.engine import TRACE_COUNTS, Engine
from cometjax.serving.generate import generate

from conftest import require_data

CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None)
PROMPTS = [[1], [1, 4, 8, 15, 16, 23, 42, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3, 9, 9], [1, 3, 3], [1, 5], [1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def model():
  return init_llama(CONFIG, seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("kv", [None, KVQuantConfig(k_mode="channel", group_tokens=8), KVQuantConfig(k_mode="token")])
def test_engine_equals_generate_with_fewer_slots_than_requests(model, kv):
  expected = [generate(model, [p], 12, stop_at_eos=False, kv=kv).tokens[0] for p in PROMPTS]
  engine = Engine(model, slots=2, max_len=64, chunk=8, kv=kv)
  assert engine.run(PROMPTS, 12) == expected


@pytest.mark.slow
def test_paged_pool_smaller_than_slots_times_max_len(model):
  kv = KVQuantConfig(k_mode="channel", group_tokens=8)
  expected = [generate(model, [p], 12, stop_at_eos=False, kv=kv).tokens[0] for p in PROMPTS]
  # 3 slots x 64 tokens would need 24 pages of 8; 7 pages hold two requests of <= 32 tokens at a time
  engine = Engine(model, slots=3, max_len=64, chunk=8, kv=kv, num_pages=7)
  assert engine.run(PROMPTS, 12) == expected
  assert engine.free_pages == 7  # every page came back
  with pytest.raises(ValueError, match="more than the pool's num_pages"):
    engine.submit([1] * 50, 10)


def test_requests_come_and_go_without_recompiling(model):
  engine = Engine(model, slots=3, max_len=64, chunk=8)
  engine.run(PROMPTS[:2], 4)
  before = dict(TRACE_COUNTS)
  rng = np.random.default_rng(0)
  first = engine.submit([1, 2, 3], 3)
  streamed = {}
  for step in range(200):
    if step % 3 == 0 and step < 30:
      engine.submit([1] + rng.integers(3, 90, rng.integers(1, 20)).tolist(), int(rng.integers(1, 10)))
    for event in engine.step():
      streamed.setdefault(event.request_id, []).append(event)
    if not engine.busy:
      break
  assert not engine.busy
  assert TRACE_COUNTS == before
  assert len(streamed[first]) == 3 and streamed[first][-1].finished
  assert all(events[-1].finished and not any(e.finished for e in events[:-1]) for events in streamed.values())


def test_eos_frees_the_slot(model):
  free = generate(model, [[1, 2]], 10, stop_at_eos=False).tokens[0]
  eos = free[2]
  cut = free[:free.index(eos) + 1]
  engine = Engine(model, slots=1, max_len=32, chunk=8, eos_ids=[eos])
  assert engine.run([[1, 2], [1, 2]], 10) == [cut, cut]


@pytest.mark.parametrize("kwargs, match", [
    (dict(slots=0), "slots"), (dict(chunk=12, kv=KVQuantConfig(group_tokens=8)), "multiple of the cache"),
    (dict(max_len=60, chunk=8), "max_len"),
])
def test_bad_engine_arguments(model, kwargs, match):
  with pytest.raises(ValueError, match=match):
    Engine(model, **{"max_len": 64, "chunk": 8, **kwargs})


def test_bad_requests(model):
  engine = Engine(model, slots=1, max_len=32, chunk=8)
  with pytest.raises(ValueError, match="at least one token"):
    engine.submit([], 3)
  with pytest.raises(ValueError, match="exceeds the engine's max_len"):
    engine.submit([1] * 30, 8)


@pytest.mark.slow
@pytest.mark.realdata
def test_engine_matches_generate_on_stories260k():
  from cometjax.checkpoint import load

  loaded = load(require_data("llama", "stories260K", "hf"))
  prompts = [[1], loaded.tokenizer.encode("Once upon a time, there was a dog"), loaded.tokenizer.encode("Tom and Sue")]
  expected = [generate(loaded.model, [p], 48).tokens[0] for p in prompts]
  engine = Engine(loaded.model, slots=2, max_len=128, chunk=16)
  assert engine.run(prompts, 48) == expected
