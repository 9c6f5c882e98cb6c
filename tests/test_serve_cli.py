"""`cometjax serve` as a user starts it: a W4A4KV4 model quantized at start-up behind a paged INT4 cache, greedy
outputs equal to offline `generate` of the same quantized model, and a graceful SIGTERM while a stream is open."""

import concurrent.futures

import httpx
import openai
import pytest

from conftest import require_data
from serve_helpers import NAME, PROMPTS, ServerProcess, offline, stream_completion, wait_idle

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def stories():
  from cometjax.checkpoint import load
  return load(require_data("llama", "stories260K", "hf"))


def test_cli_serves_w4a4kv4_with_a_paged_int4_cache_and_stops_gracefully_mid_stream(stories):
  import cometjax

  model = str(require_data("llama", "stories260K", "hf"))
  with ServerProcess(["--model", model, "--model-name", NAME, "--preset", "w4a4-kv4", "--slots", "4",
                      "--max-len", "128", "--num-pages", "12"]) as server:
    health = server.health()
    assert health["num_pages"] == 12 and health["free_pages"] == 12
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    config = cometjax.preset("w4a4-kv4")
    quantized = cometjax.quantize(stories.model, config, progress=False)
    prompt = stories.tokenizer.encode(PROMPTS[2])
    expected = offline(stories, prompt, 60, kv=config.kv, model=quantized)[0]
    assert expected != offline(stories, prompt, 60)[0]  # W4A4 changes the text: the server runs the quantized model
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      texts = list(pool.map(lambda _: stream_completion(client, PROMPTS[2], 60)[0], range(4)))
    assert texts == [expected] * 4
    wait_idle(server)
    with httpx.Client(base_url=server.url, timeout=60) as http:
      with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "Once", "max_tokens": 120,
                                                        "temperature": 0, "stream": True}) as r:
        next(r.iter_lines())  # then the client goes away: its pages come back
      assert wait_idle(server)["cancelled"] == 1
      with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "Once", "max_tokens": 100,
                                                        "stream": True}) as r:
        next(r.iter_lines())
        assert server.stop() == 0, server.read_log()[-3000:]  # SIGTERM while a stream is open
