"""An OpenAI-compatible HTTP API (Starlette) over one continuous-batching `Engine`.

    app = create_app(engine, tokenizer, model_name="stories260K")   # then uvicorn.run(app, ...)

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with "stream": true as server-sent
events), GET /v1/models, GET /health. Every request joins the one engine, which a single thread owns
(`EngineThread`); a request waits on its own asyncio queue for the tokens that thread hands over. A client
that disconnects, or a stop string that matches, cancels its request so its slot and pages are freed.

The tokenizer is duck-typed: `encode(text)` (it decides on BOS), `decode(ids)`, `eos_id`, and for chat
`apply_chat_template(messages, add_generation_prompt=True) -> ids` with `end_of_turn_ids`; without
`apply_chat_template`, /v1/chat/completions answers 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from cometjax.serving import openai_api as api
from cometjax.serving.detokenize import IncrementalDecoder
from cometjax.serving.engine import Engine
from cometjax.serving.engine_thread import EngineStopped, EngineThread, Submission, warm_up
from cometjax.serving.generate import SamplingConfig

MAX_BODY_BYTES = 4 << 20


@dataclasses.dataclass
class _Job:
  """One request on its way through the engine thread."""
  prompt: list[int]
  queue: asyncio.Queue
  ticket: int = -1
  completion_tokens: int = 0


class _Server:
  def __init__(self, engine: Engine, tokenizer, model_name: str):
    self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
    self.thread = EngineThread(engine)
    self.created = int(time.time())
    eos = getattr(tokenizer, "eos_id", None)
    self.stop_ids = tuple(sorted(set(engine.eos_ids) | ({eos} if eos is not None else set())))

  # ---- from a request body to a submission

  def prompt_ids(self, request: api.GenerationRequest) -> tuple[list[int], tuple[int, ...]]:
    """The prompt's token ids and the extra ids that end this request."""
    if request.messages is not None:
      template = getattr(self.tokenizer, "apply_chat_template", None)
      if template is None:
        raise api.APIError(400, f"model {self.model_name!r} has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
      ids = list(template(list(request.messages), add_generation_prompt=True))
      return ids, tuple(getattr(self.tokenizer, "end_of_turn_ids", ()))
    if isinstance(request.prompt, str):
      ids = list(self.tokenizer.encode(request.prompt))
    else:
      ids = list(request.prompt)
      vocab = self.engine.model.config.vocab_size
      if min(ids) < 0 or max(ids) >= vocab:
        raise api.APIError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt")
    if not ids:
      raise api.APIError(400, "'prompt' encodes to no tokens", param="prompt")
    return ids, ()

  def submission(self, request: api.GenerationRequest, prompt: list[int], stop_ids) -> Submission:
    capacity = self.engine.max_request_tokens
    default = api.COMPLETIONS_DEFAULT_MAX_TOKENS if request.messages is None else capacity - len(prompt)
    max_tokens = request.max_tokens if request.max_tokens is not None else min(default, capacity - len(prompt))
    if max_tokens < 1 or len(prompt) + max_tokens > capacity:
      what = "messages" if request.messages is not None else "prompt"
      raise api.APIError(400, f"This model's maximum context length is {capacity} tokens. However, you requested "
                         f"{len(prompt) + max(max_tokens, 1)} tokens ({len(prompt)} in the {what}, "
                         f"{max(max_tokens, 1)} in the completion). Please reduce the length of the {what} or "
                         "completion.", param="max_tokens", code="context_length_exceeded")
    sampling = SamplingConfig(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
    return Submission(tuple(prompt), max_tokens, sampling, request.seed, tuple(self.stop_ids) + tuple(stop_ids))

  def start(self, request: api.GenerationRequest) -> tuple[_Job, IncrementalDecoder]:
    if request.model != self.model_name:
      raise api.APIError(404, f"The model {request.model!r} does not exist; this server serves "
                         f"{self.model_name!r}", param="model", code="model_not_found")
    prompt, stop_ids = self.prompt_ids(request)
    submission = self.submission(request, prompt, stop_ids)
    loop = asyncio.get_running_loop()
    job = _Job(prompt, asyncio.Queue())
    job.ticket = self.thread.submit(submission, lambda item: loop.call_soon_threadsafe(job.queue.put_nowait, item))
    decoder = IncrementalDecoder(self.tokenizer, prompt, stop=request.stop,
                                 skip_ids=submission.stop_ids)
    return job, decoder

  async def pieces(self, job: _Job, decoder: IncrementalDecoder) -> AsyncIterator[tuple[str, str | None]]:
    """(text, finish_reason) as tokens arrive; the last piece has the reason. Closed early (a client gone),
    it cancels the engine request."""
    finished = False
    try:
      while True:
        item = await job.queue.get()
        if isinstance(item, EngineStopped):
          raise api.APIError(503, str(item), type="server_error", code="engine_stopped")
        if isinstance(item, BaseException):  # the engine refused the submission
          raise api.APIError(400, str(item))
        job.completion_tokens += 1
        text = decoder.push(item.token)
        if decoder.stopped:  # a stop string: the engine request is cancelled in `finally`
          yield text, "stop"
          return
        if item.finished:
          finished = True
          yield text + decoder.flush(), item.finish_reason
          return
        if text:
          yield text, None
    finally:
      if not finished:
        self.thread.cancel(job.ticket)


async def _read_json(request: Request):
  body = await request.body()
  if len(body) > MAX_BODY_BYTES:
    raise api.APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
  try:
    return json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise api.APIError(400, f"the request body is not valid JSON: {e}") from None


async def _until_disconnected(request: Request):
  while (await request.receive())["type"] != "http.disconnect":
    pass


async def _collect(server: _Server, request: Request, job: _Job, decoder) -> tuple[str, str]:
  """The whole completion; a client that disconnects first cancels it (its slot and pages are freed)."""

  async def consume():
    texts, reason = [], None
    async for text, reason in server.pieces(job, decoder):
      texts.append(text)
    return "".join(texts), reason

  collect, gone = asyncio.ensure_future(consume()), asyncio.ensure_future(_until_disconnected(request))
  try:
    await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    gone.cancel()
    if not collect.done():
      collect.cancel()
  if collect.cancelled():
    raise api.APIError(499, "the client closed the request")
  return collect.result()


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(server: _Server, job: _Job, decoder, request: api.GenerationRequest, chat: bool, rid: str):
  created, name = int(time.time()), server.model_name
  chunk = ((lambda text, reason: api.chat_chunk(rid, name, created, {"content": text} if text else {}, reason))
           if chat else (lambda text, reason: api.completion_chunk(rid, name, created, text, reason)))
  if chat:
    yield _sse(api.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}, None))
  pieces = server.pieces(job, decoder)
  try:
    async for text, reason in pieces:
      yield _sse(chunk(text, reason))
    if request.include_usage:
      yield _sse(api.usage_chunk(rid, name, created, chat, api.usage(len(job.prompt), job.completion_tokens)))
  except api.APIError as e:  # the status line is gone already: the error travels as an event
    yield _sse(e.body())
  finally:
    await pieces.aclose()
  yield "data: [DONE]\n\n"


def _completions_endpoint(server: _Server, chat: bool):
  async def endpoint(request: Request):
    parsed = api.parse_request(await _read_json(request), chat=chat)
    if not server.thread.running:
      raise api.APIError(503, "the engine is not running", type="server_error", code="engine_stopped")
    job, decoder = server.start(parsed)
    rid = api.new_id(chat)
    if parsed.stream:
      return StreamingResponse(_stream(server, job, decoder, parsed, chat, rid), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, reason = await _collect(server, request, job, decoder)
    respond = api.chat_response if chat else api.completion_response
    return JSONResponse(respond(rid, server.model_name, int(time.time()), text, reason,
                                api.usage(len(job.prompt), job.completion_tokens)))
  return endpoint


def _error_handlers() -> dict:
  async def api_error(request, e: api.APIError):
    return JSONResponse(e.body(), status_code=e.status)

  async def http_error(request, e: HTTPException):
    return JSONResponse(api.APIError(e.status_code, str(e.detail), code=str(e.status_code)).body(),
                        status_code=e.status_code)

  async def server_error(request, e: Exception):
    error = api.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
    return JSONResponse(error.body(), status_code=500)

  return {api.APIError: api_error, HTTPException: http_error, Exception: server_error}


def create_app(engine: Engine, tokenizer, *, model_name: str, warm: bool = True) -> Starlette:
  """The ASGI app. Its lifespan compiles the engine's steps (`warm`), starts the engine thread, and
  stops it at shutdown (requests still running then get a 503 / an error event)."""
  server = _Server(engine, tokenizer, model_name)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if warm:
      await asyncio.to_thread(warm_up, engine)
    server.thread.start()
    try:
      yield
    finally:
      await asyncio.to_thread(server.thread.stop)

  async def models(request):
    return JSONResponse({"object": "list", "data": [api.model_card(model_name, engine.max_len, server.created)]})

  async def model(request):
    if request.path_params["name"] != model_name:
      raise api.APIError(404, f"The model {request.path_params['name']!r} does not exist", param="model",
                         code="model_not_found")
    return JSONResponse(api.model_card(model_name, engine.max_len, server.created))

  async def health(request):
    ok = server.thread.running
    stats = dataclasses.asdict(server.thread.stats)
    return JSONResponse({"status": "ok" if ok else "stopped", **stats}, status_code=200 if ok else 503)

  routes = [Route("/v1/completions", _completions_endpoint(server, chat=False), methods=["POST"]),
            Route("/v1/chat/completions", _completions_endpoint(server, chat=True), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"])]
  app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=_error_handlers())
  app.state.server = server
  return app
