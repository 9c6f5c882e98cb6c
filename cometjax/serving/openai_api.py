"""The OpenAI API's request fields and response shapes (completions, chat completions), framework-free.

`parse_request` turns a decoded JSON body into a `GenerationRequest` or raises `APIError` naming the
field and what it accepts; the `*_response` / `*_chunk` builders give the bodies the OpenAI clients read.
Fields the engine cannot honour (n > 1, echo, logprobs, penalties, tools) are refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

# OpenAI's documented ranges; top_k (an extension, as in vLLM) is capped far above any vocabulary
TEMPERATURE_RANGE = (0.0, 2.0)
MAX_STOP_SEQUENCES = 4
MAX_TOP_K = 1 << 30
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# (field, values that mean "off"): anything else is refused, as the engine cannot honour it
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
               "top_logprobs": (None, 0), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
               "functions": (None, []), "tool_choice": (None, "none")}
ROLES = ("system", "user", "assistant", "developer", "tool")


class APIError(Exception):
  """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with `status`."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  model: str
  prompt: str | tuple[int, ...] | None  # completions: text or token ids
  messages: tuple[dict, ...] | None  # chat: ({"role", "content": str}, ...)
  max_tokens: int | None  # None: the endpoint's default
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  seed: int | None = None  # folded into [0, 2**32)
  stop: tuple[str, ...] = ()
  stream: bool = False
  include_usage: bool = False


def _field(body: dict, name: str, kinds: tuple, default=None):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
    names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer") for k in kinds)
    raise APIError(400, f"'{name}' must be {names}, got {value!r}", param=name)
  return value


def _number(body: dict, name: str, default, low: float, high: float, *, integer: bool = False,
            low_open: bool = False):
  value = _field(body, name, (int,) if integer else (int, float), default)
  if value is None:
    return None
  if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    raise APIError(400, f"'{name}' must be in {interval}, got {value!r}", param=name)
  return value


def _stop(body: dict) -> tuple[str, ...]:
  stop = body.get("stop")
  if stop is None:
    return ()
  stops = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
      or not all(isinstance(s, str) and s for s in stops)):
    raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty "
                   f"strings, got {stop!r}", param="stop")
  return tuple(stops)


def _prompt(body: dict) -> str | tuple[int, ...]:
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of one
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    return tuple(prompt)
  if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    raise APIError(400, "'prompt' holds several prompts; send one request per prompt", param="prompt")
  raise APIError(400, f"'prompt' must be a string or a non-empty list of token ids, got {prompt!r}", param="prompt")


def _content(message: dict, index: int) -> str:
  content = message.get("content")
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise APIError(400, f"messages[{index}].content must be a string or a list of text parts, got {content!r}",
                 param=f"messages[{index}].content")


def _messages(body: dict) -> tuple[dict, ...]:
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise APIError(400, f"'messages' must be a non-empty list of {{role, content}} objects, got {messages!r}",
                   param="messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise APIError(400, f"messages[{i}] must be an object whose role is one of {', '.join(ROLES)}, got {m!r}",
                     param=f"messages[{i}].role")
    out.append({"role": m["role"], "content": _content(m, i)})
  return tuple(out)


def _refuse_unsupported(body: dict):
  for name, off in UNSUPPORTED.items():
    if body.get(name) not in off:
      raise APIError(400, f"'{name}' = {body[name]!r} is not supported by this server", param=name,
                     code="unsupported_parameter")


def parse_request(body: Any, *, chat: bool) -> GenerationRequest:
  """A decoded JSON body of /v1/completions (chat=False) or /v1/chat/completions -> the request."""
  if not isinstance(body, dict):
    raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise APIError(400, "'model' is required: the name of a served model (see /v1/models)", param="model")
  _refuse_unsupported(body)
  max_tokens = _number(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                       None, 1, 1 << 31, integer=True)
  top_k = _number(body, "top_k", 0, -1, MAX_TOP_K, integer=True)
  seed = _number(body, "seed", None, 0, (1 << 64) - 1, integer=True)
  stream_options = _field(body, "stream_options", (dict,), {})
  return GenerationRequest(
      model=model, prompt=None if chat else _prompt(body), messages=_messages(body) if chat else None,
      max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, *TEMPERATURE_RANGE)),
      top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)), top_k=max(top_k, 0),  # -1: off, as vLLM
      seed=None if seed is None else (seed & 0xFFFFFFFF) ^ (seed >> 32), stop=_stop(body),
      stream=_field(body, "stream", (bool,), False),
      include_usage=bool(stream_options.get("include_usage", False)))


def new_id(chat: bool) -> str:
  return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _envelope(request_id: str, model: str, created: int, obj: str, choices: list, usage_: dict | None) -> dict:
  body = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
  if usage_ is not None:
    body["usage"] = usage_
  return body


def completion_response(request_id: str, model: str, created: int, text: str, finish_reason: str,
                        usage_: dict) -> dict:
  choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
  return _envelope(request_id, model, created, "text_completion", [choice], usage_)


def chat_response(request_id: str, model: str, created: int, text: str, finish_reason: str, usage_: dict) -> dict:
  choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}
  return _envelope(request_id, model, created, "chat.completion", [choice], usage_)


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
  choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
  return _envelope(request_id, model, created, "text_completion", [choice], None)


def chat_chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
  choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
  return _envelope(request_id, model, created, "chat.completion.chunk", [choice], None)


def usage_chunk(request_id: str, model: str, created: int, chat: bool, usage_: dict) -> dict:
  obj = "chat.completion.chunk" if chat else "text_completion"
  return _envelope(request_id, model, created, obj, [], usage_)


def model_card(name: str, max_len: int, created: int | None = None) -> dict:
  return {"id": name, "object": "model", "created": int(time.time()) if created is None else created,
          "owned_by": "cometjax", "max_model_len": max_len}
