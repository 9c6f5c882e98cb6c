"""The serving layer without a socket: request parsing, incremental detokenization with stop strings, and
the ASGI app in-process (Starlette's TestClient) over a tiny random model with a character tokenizer."""

import json
import subprocess
import sys

import pytest

from cometjax.serving import openai_api as api
from cometjax.serving.detokenize import IncrementalDecoder


class SpaceDroppingTokenizer:
  """ids -> pieces; like SentencePiece, decode drops the leading space of the text and skips BOS/EOS."""
  bos_id, eos_id = 1, 2

  def __init__(self, pieces):
    self.pieces = pieces

  def decode(self, ids):
    text = b"".join(self.pieces[i] for i in ids if i not in (1, 2)).decode("utf-8", errors="replace")
    return text[1:] if text.startswith(" ") else text


PIECES = {i: p for i, p in enumerate([b"", b"", b"", b" Once", b" upon", b" a", b" time", b",", b" the", b" end",
                                      b" caf", b"\xc3", b"\xa9", b"!"])}


def decode_stream(tokenizer, prompt, tokens, **kwargs):
  decoder = IncrementalDecoder(tokenizer, prompt, **kwargs)
  pieces = [decoder.push(t) for t in tokens]
  return pieces + [decoder.flush()], decoder


def test_incremental_text_equals_decoding_the_whole():
  tok = SpaceDroppingTokenizer(PIECES)
  prompt, generated = [1, 3, 4], [5, 6, 7, 8, 10, 11, 12, 13, 9]
  pieces, _ = decode_stream(tok, prompt, generated)
  whole = tok.decode(prompt + generated)[len(tok.decode(prompt)):]
  assert "".join(pieces) == whole == " a time, the café! end"
  assert pieces[generated.index(11)] == "" and pieces[generated.index(12)] == "é"  # a split UTF-8 character
  assert "\ufffd" not in "".join(pieces)


def test_stop_strings_cut_the_text_and_hold_back_partial_matches():
  tok = SpaceDroppingTokenizer(PIECES)
  pieces, decoder = decode_stream(tok, [1, 3], [4, 5, 6, 7, 8, 9], stop=(" time,", "zz"))
  assert "".join(pieces) == " upon a" and decoder.stopped
  assert pieces[2] == ""  # " time" could begin " time,": held back until "," decides
  pieces, decoder = decode_stream(tok, [1, 3], [4, 6, 8, 2], stop=(" time!",), skip_ids=(2,))
  assert "".join(pieces) == " upon time the" and not decoder.stopped  # the held " time" comes out in the end


def test_parse_request_defaults_and_refusals():
  r = api.parse_request({"model": "m", "prompt": "hi"}, chat=False)
  assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop, r.stream) == (None, 1.0, 1.0, 0, None, (),
                                                                                        False)
  r = api.parse_request({"model": "m", "prompt": [[1, 5]], "stop": "x", "top_k": -1, "seed": 2 ** 40 + 3,
                         "stream": True, "stream_options": {"include_usage": True}}, chat=False)
  assert r.prompt == (1, 5) and r.stop == ("x",) and r.top_k == 0 and r.include_usage and 0 <= r.seed < 2 ** 32
  chat = api.parse_request({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                     {"type": "text", "text": "b"}]}],
                            "max_completion_tokens": 7}, chat=True)
  assert chat.messages == ({"role": "user", "content": "ab"},) and chat.max_tokens == 7
  for body, param in [({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
                      ({"model": "m", "prompt": "x", "temperature": float("nan")}, "temperature"),
                      ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
                      ({"model": "m", "prompt": "x", "echo": True}, "echo"),
                      ({"model": "m", "prompt": "x", "logprobs": 3}, "logprobs"),
                      ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
                      ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
                      ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content")]:
    with pytest.raises(api.APIError) as e:
      api.parse_request(body, chat="messages" in body)
    assert e.value.status == 400 and e.value.param == param, body


class CharTokenizer:
  """One id per character (ord % 90 + 3), BOS 1, EOS 2; with `template`, a chat template too."""
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [1] + [3 + ord(c) % 90 for c in text]

  def decode(self, ids):
    return "".join(chr(97 + (i - 3) % 26) for i in ids if i > 2)


class ChatCharTokenizer(CharTokenizer):
  end_of_turn_ids = (40,)

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return self.encode("|".join(m["content"] for m in messages) + ">")


@pytest.fixture(scope="module")
def tiny():
  from cometjax.models.llama import TINY_CONFIG, init_llama
  return init_llama(TINY_CONFIG.replace(num_layers=1, tie_word_embeddings=False, eos_token_id=None), seed=1)


def _client(model, tokenizer, warm=True):
  from starlette.testclient import TestClient

  from cometjax.serving.engine import Engine
  from cometjax.serving.http import create_app
  return TestClient(create_app(Engine(model, slots=2, max_len=32, chunk=16), tokenizer, model_name="tiny",
                               warm=warm))


def _events(response):
  lines = [line for line in response.iter_lines() if line]
  assert lines[-1] == "data: [DONE]"
  return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.slow
def test_app_in_process(tiny):
  from cometjax.serving.generate import generate

  tok = ChatCharTokenizer()
  expected = generate(tiny, [tok.encode("ab")], 6, stop_at_eos=False).tokens[0]
  with _client(tiny, tok) as client:
    assert client.get("/health").json()["status"] == "ok"
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == tok.decode(expected) and r["usage"]["completion_tokens"] == 6
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
      events = _events(s)
    assert "".join(e["choices"][0]["text"] for e in events) == tok.decode(expected)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                     "temperature": 0}).json()
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"] <= 32  # default: up to the context
    r = client.post("/v1/completions", json={**body, "max_tokens": 40})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert client.get("/v1/nowhere").status_code == 404
  with _client(tiny, CharTokenizer(), warm=False) as client:  # refused before the engine is involved
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_serve_help_imports_neither_jax_nor_the_web_stack():
  code = ("import sys\nfrom cometjax.cli import main\ntry:\n  main(['serve', '--help'])\nexcept SystemExit:\n  pass\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'starlette', 'uvicorn')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "--slots" in out.stdout and "127.0.0.1" in out.stdout and out.stdout.strip().endswith("[]")
