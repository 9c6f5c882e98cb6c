import numpy as np
import pytest

from cometjax.core.kv_config import KVQuantConfig
from cometjax.models.llama import LlamaConfig, init_llama
from cometjax.serving.engine import TRACE_COUNTS, Engine
from cometjax.serving.generate import SamplingConfig, generate

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


def test_per_request_sampling_is_seeded_and_never_recompiles(model):
  engine = Engine(model, slots=3, max_len=64, chunk=8)
  hot, cool = SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.6, top_k=5, top_p=0.9)

  def run(requests):
    ids = [engine.submit(p, 10, **kw) for p, kw in requests]
    out = {i: [] for i in ids}
    for event in engine.stream():
      out[event.request_id].append(event.token)
    return [out[i] for i in ids]

  alone = run([([1, 2, 3], dict(sampling=hot, seed=7))])[0]
  before = dict(TRACE_COUNTS)
  mixed = run([([1, 5], dict(sampling=cool, seed=1)), ([1, 2, 3], dict(sampling=hot, seed=7)), ([1, 4], {}),
               ([1, 2, 3], dict(sampling=hot, seed=8))])
  assert TRACE_COUNTS == before  # new settings, seeds and batch-mates: no new compilation
  assert mixed[1] == alone  # a seeded request draws the same tokens whoever shares the batch
  assert mixed[3] != alone
  assert mixed[2] == generate(model, [[1, 4]], 10, stop_at_eos=False).tokens[0]  # the engine default: greedy


@pytest.mark.slow
def test_cancel_frees_the_slot_and_pages_and_finish_reasons(model):
  kv = KVQuantConfig(k_mode="token")
  need = Engine(model, slots=1, max_len=32, chunk=8, kv=kv).pages_needed(3, 20)
  engine = Engine(model, slots=3, max_len=32, chunk=8, kv=kv, num_pages=2 * need + 1)
  waiting = [engine.submit([1, 2, 3], 20) for _ in range(3)]  # the third waits for pages
  engine.step()
  assert engine.active_requests == 2 and engine.waiting_requests == 1 and engine.free_pages == 1
  assert engine.cancel(waiting[2]) and engine.waiting_requests == 0
  assert engine.cancel(waiting[0]) and engine.active_requests == 1 and engine.free_pages == need + 1
  assert not engine.cancel(waiting[0])  # already gone
  events = list(engine.stream())
  assert {e.request_id for e in events} == {waiting[1]}
  assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
  assert engine.free_pages == 2 * need + 1
  free = generate(model, [[1, 2]], 6, stop_at_eos=False).tokens[0]
  engine.submit([1, 2], 6, stop_ids=[free[3]])
  events = list(engine.stream())
  assert [e.token for e in events] == free[:free.index(free[3]) + 1] and events[-1].finish_reason == "stop"


def test_bad_per_request_arguments(model):
  engine = Engine(model, slots=1, max_len=32, chunk=8)
  with pytest.raises(ValueError, match="seed"):
    engine.submit([1], 3, seed=-1)
  with pytest.raises(ValueError, match="vocab_size"):
    engine.submit([1, 97], 3)


@pytest.mark.slow
@pytest.mark.realdata
def test_engine_matches_generate_on_stories260k():
  from cometjax.checkpoint import load

  loaded = load(require_data("llama", "stories260K", "hf"))
  prompts = [[1], loaded.tokenizer.encode("Once upon a time, there was a dog"), loaded.tokenizer.encode("Tom and Sue")]
  expected = [generate(loaded.model, [p], 48).tokens[0] for p in prompts]
  engine = Engine(loaded.model, slots=2, max_len=128, chunk=16)
  assert engine.run(prompts, 48) == expected
