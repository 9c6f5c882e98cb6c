"""One thread owns an `Engine` (and so the device); other threads submit and cancel through a queue.

Each submission names a callback `deliver(item)`, called in the engine thread with every `TokenEvent` of
the request, or once with an exception when the request is refused or the engine shuts down. Callers on
an asyncio loop pass `loop.call_soon_threadsafe`-wrapped callbacks. While requests run the thread steps
the engine; while none do it sleeps on the queue.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import traceback
from typing import Callable, Sequence

from cometjax.serving.engine import TRACE_COUNTS, Engine
from cometjax.serving.generate import SamplingConfig


class EngineStopped(RuntimeError):
  """The engine thread stopped (shutdown or a failed step) before the request finished."""


@dataclasses.dataclass(frozen=True)
class Submission:
  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: SamplingConfig
  seed: int | None = None
  stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """A snapshot the engine thread publishes after each step (read from any thread)."""
  active: int = 0
  waiting: int = 0
  free_pages: int | None = None
  num_pages: int | None = None
  steps: int = 0
  generated_tokens: int = 0
  cancelled: int = 0  # requests dropped before they finished (clients gone, stop strings)
  compilations: int = 0  # engine steps traced so far in this process: constant once warmed up


class EngineThread:
  """`start()`, then `submit(...)` / `cancel(ticket)` from any thread, `stop()` at the end."""

  def __init__(self, engine: Engine, *, idle_wait_s: float = 0.05):
    self.engine = engine
    self._idle_wait_s = idle_wait_s
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._tickets = itertools.count()
    self._live: dict[int, tuple[int, Callable]] = {}  # ticket -> (engine request id, deliver); engine thread only
    self._by_request: dict[int, int] = {}  # engine request id -> ticket
    self._thread = threading.Thread(target=self._loop, name="cometjax-engine", daemon=True)
    self._stopping = threading.Event()
    self.stats = EngineStats(free_pages=engine.free_pages, num_pages=engine.num_pages,
                             compilations=sum(TRACE_COUNTS.values()))
    self.error: BaseException | None = None

  def start(self) -> "EngineThread":
    self._thread.start()
    return self

  def stop(self, timeout: float | None = 30.0):
    """Ends the thread; requests still running get `EngineStopped`."""
    self._stopping.set()
    self._commands.put(("wake",))
    if self._thread.is_alive():
      self._thread.join(timeout)

  @property
  def running(self) -> bool:
    return self._thread.is_alive() and not self._stopping.is_set()

  def submit(self, submission: Submission, deliver: Callable) -> int:
    """Queues a request; returns its ticket (for `cancel`). Refusals arrive through `deliver`."""
    ticket = next(self._tickets)
    if not self.running:
      deliver(EngineStopped("the engine is not running"))
      return ticket
    self._commands.put(("submit", ticket, submission, deliver))
    return ticket

  def cancel(self, ticket: int):
    """Frees the request's slot and pages; nothing more is delivered for it. Unknown tickets are ignored."""
    self._commands.put(("cancel", ticket))

  def _loop(self):
    self._publish()  # the warm-up ran before the thread started
    try:
      while not self._stopping.is_set():
        self._drain(block=not self.engine.busy)
        if self.engine.busy and not self._stopping.is_set():
          self._step()
    except BaseException as e:  # a failed step: every waiting client hears of it, the server reports unhealthy
      self.error = e
      traceback.print_exc()
    finally:
      self._stopping.set()
      self._fail_all(EngineStopped("the engine stopped" + (f": {self.error}" if self.error else "")))

  def _drain(self, block: bool):
    try:
      command = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
    except queue.Empty:
      return
    while True:
      self._handle(command)
      try:
        command = self._commands.get_nowait()
      except queue.Empty:
        return

  def _handle(self, command):
    kind = command[0]
    if kind == "submit":
      _, ticket, s, deliver = command
      try:
        request_id = self.engine.submit(s.prompt, s.max_new_tokens, sampling=s.sampling, seed=s.seed,
                                        stop_ids=s.stop_ids)
      except ValueError as e:
        deliver(e)
        return
      self._live[ticket] = (request_id, deliver)
      self._by_request[request_id] = ticket
    elif kind == "cancel":
      entry = self._live.pop(command[1], None)
      if entry is not None:
        self.engine.cancel(entry[0])
        del self._by_request[entry[0]]
        self._publish(cancelled=1)
        return
    self._publish()

  def _step(self):
    events = self.engine.step()
    for event in events:
      ticket = self._by_request.get(event.request_id)
      if ticket is None:
        continue
      _, deliver = self._live[ticket]
      if event.finished:
        del self._live[ticket], self._by_request[event.request_id]
      deliver(event)
    self._publish(steps=1, tokens=len(events))

  def _publish(self, steps: int = 0, tokens: int = 0, cancelled: int = 0):
    e = self.engine
    self.stats = EngineStats(active=e.active_requests, waiting=e.waiting_requests, free_pages=e.free_pages,
                             num_pages=e.num_pages, steps=self.stats.steps + steps,
                             generated_tokens=self.stats.generated_tokens + tokens,
                             cancelled=self.stats.cancelled + cancelled,
                             compilations=sum(TRACE_COUNTS.values()))

  def _fail_all(self, error: BaseException):
    while True:  # submissions that never reached the engine
      try:
        command = self._commands.get_nowait()
      except queue.Empty:
        break
      if command[0] == "submit":
        command[3](error)
    for request_id, deliver in self._live.values():
      deliver(error)
    self._live.clear()
    self._by_request.clear()


def warm_up(engine: Engine, prompt: Sequence[int] = (1,)):
  """Compiles the prefill and decode steps before the first client waits for them (run on the owning
  thread, before `EngineThread.start`)."""
  engine.submit(list(prompt), 2)
  for _ in engine.stream():
    pass
