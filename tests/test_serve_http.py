"""`cometjax serve` in a subprocess on a free loopback port, talked to with the openai client and httpx:
greedy outputs equal offline `generate`, bad requests get 4xx JSON errors while others finish, a client
that disconnects frees its slot (and pages), and every server stops gracefully on SIGTERM."""

import concurrent.futures
import json

import httpx
import openai
import pytest


from conftest import load_bench_script, require_data
from serve_helpers import NAME, PROMPTS, ChatTokenizer, ServerProcess, offline, stream_completion, wait_idle

# One server per module and xdist worker (each worker that runs a test here starts its own)
pytestmark = [pytest.mark.realdata, pytest.mark.slow]
@pytest.fixture(scope="module")
def stories():
  from cometjax.checkpoint import load
  return load(require_data("llama", "stories260K", "hf"))


@pytest.fixture(scope="module")
def server():
  args = ["--model", str(require_data("llama", "stories260K", "hf")), "--model-name", NAME, "--slots", "8",
          "--max-len", "512", "--chunk", "32"]
  with ServerProcess(args, chat_tokenizer=True) as s:
    yield s
    assert s.stop() == 0, s.read_log()[-3000:]  # SIGTERM: a graceful shutdown


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion_equals_offline_generate(server, client, stories):
  prompt = stories.tokenizer.encode(PROMPTS[0])
  response = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0)
  text, count, reason = offline(stories, prompt, 40)
  assert response.id.startswith("cmpl-") and response.object == "text_completion" and response.model == NAME
  assert response.choices[0].text == text and response.choices[0].finish_reason == reason
  assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt), count)
  assert response.usage.total_tokens == len(prompt) + count
  by_ids = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)  # token-id prompt
  assert by_ids.choices[0].text == text
  assert [m.id for m in client.models.list().data] == [NAME]


def test_eight_concurrent_streams_equal_offline_generate_without_recompiling(server, client, stories):
  compilations = server.health()["compilations"]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(lambda p: stream_completion(client, p, 48), PROMPTS))
  for prompt, (text, reasons, usage, ids) in zip(PROMPTS, results):
    prompt_ids = stories.tokenizer.encode(prompt)
    expected, count, reason = offline(stories, prompt_ids, 48)
    assert text == expected
    assert reasons[-1] == reason and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == count and usage.prompt_tokens == len(prompt_ids)
    assert len(ids) == 1
  assert server.health()["compilations"] == compilations  # requests came and went: no new compilation


def test_chat_streaming_and_not(server, client, stories):
  messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story about a cat"}]
  chat = ChatTokenizer(stories.tokenizer)
  prompt = chat.apply_chat_template(messages, add_generation_prompt=True)
  text, count, reason = offline(stories, prompt, 64, stop_ids=chat.end_of_turn_ids)
  assert reason == "stop"  # the template's end-of-turn token ended the turn
  response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=64, temperature=0)
  assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
  choice = response.choices[0]
  assert choice.message.role == "assistant" and choice.message.content == text and choice.finish_reason == "stop"
  assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == count
  chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=64, temperature=0,
                                               stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].object == "chat.completion.chunk"


def test_seeded_sampling_and_stop_strings(server, client, stories):
  sample = lambda seed: client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=24, temperature=1.0,
                                                  top_p=0.95, seed=seed, extra_body={"top_k": 40}).choices[0].text
  assert sample(5) == sample(5)
  assert len({sample(5), sample(6), sample(7)}) > 1
  full, _, _ = offline(stories, stories.tokenizer.encode(PROMPTS[0]), 40)
  stop = " little"
  assert stop in full
  response = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "zzz"])
  assert response.choices[0].text == full[:full.index(stop)] and response.choices[0].finish_reason == "stop"
  streamed, reasons, _, _ = stream_completion(client, PROMPTS[0], 40, stop=stop)
  assert streamed == full[:full.index(stop)] and reasons[-1] == "stop"


BAD_REQUESTS = [  # (endpoint, body: a dict or raw bytes, status, param or None)
    ("completions", {"model": NAME, "prompt": "Once", "max_tokens": 600}, 400, "max_tokens"),
    ("completions", {"model": "gpt-4", "prompt": "Once"}, 404, "model"),
    ("completions", b'{"model": "stories260K", "prompt": ', 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"prompt": "Once"}, 400, "model"),
    ("completions", {"model": NAME, "prompt": "Once", "max_tokens": -3}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "Once", "max_tokens": "ten"}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "Once", "temperature": -1}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "Once", "temperature": 1e9}, 400, "temperature"),
    ("completions", {"model": NAME, "prompt": "Once", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": NAME, "prompt": "Once", "top_k": -5}, 400, "top_k"),
    ("completions", {"model": NAME, "prompt": "Once", "seed": -1}, 400, "seed"),
    ("completions", {"model": NAME, "prompt": "Once", "n": 3}, 400, "n"),
    ("completions", {"model": NAME, "prompt": "Once", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": [1, 10 ** 6]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": ["one", "two"]}, 400, "prompt"),
    ("chat/completions", {"model": NAME}, 400, "messages"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400,
     "max_tokens"),
]


def test_bad_requests_get_4xx_json_while_others_finish(server, client, stories):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    running = [pool.submit(stream_completion, client, p, 100) for p in PROMPTS[:2]]
    with httpx.Client(base_url=server.url, timeout=60) as http:
      for endpoint, body, status, param in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = http.post(f"/v1/{endpoint}", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["param"] == param, (body, error)
      r = http.get("/v1/completions")
      assert r.status_code == 405 and "error" in r.json()
      with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "Once", "max_tokens": 110,
                                                        "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # then the client goes away mid-stream
    for prompt, future in zip(PROMPTS[:2], running):
      assert future.result()[0] == offline(stories, stories.tokenizer.encode(prompt), 100)[0]
  wait_idle(server)


def test_disconnect_mid_request_frees_the_slot(server):
  # 400 tokens take seconds here; each client leaves after its first token, so only a cancel ends them early
  before = server.health()
  with httpx.Client(base_url=server.url, timeout=60) as http:
    with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "Once", "max_tokens": 400,
                                                      "temperature": 0, "stream": True}) as r:
      next(r.iter_lines())
  with pytest.raises(httpx.ReadTimeout):  # a non-streaming request given up by its client
    httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "Once", "max_tokens": 400},
               timeout=0.5)
  after = wait_idle(server)
  assert after["cancelled"] == before["cancelled"] + 2
  assert after["generated_tokens"] - before["generated_tokens"] < 2 * 400


def test_load_bench_smoke_against_this_server(server, tmp_path):
  bench = load_bench_script("serve_load")
  out = tmp_path / "serve_load.json"
  bench.main(["--smoke", "--url", server.url, "--model-name", NAME, "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["smoke"] is True and report["device"] and report["commit"]
  assert [p["clients"] for p in report["phases"]] == [1, 4]
  for phase in report["phases"]:
    assert phase["requests"] == 2 * phase["clients"] and 0 < phase["completion_tokens"] <= 16 * phase["requests"]
    assert phase["tokens_per_s"] > 0 and 0 < phase["ttft_ms"]["p50"] <= phase["ttft_ms"]["p99"]
    assert phase["itl_ms"]["p50"] > 0
  assert report["throughput_ratio_max_clients_vs_1"] > 0  # its size is the bench's finding, not a test's
