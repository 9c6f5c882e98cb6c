"""What the server tests share: servers in subprocesses on a free loopback port, always stopped (SIGTERM, then
SIGKILL); a chat tokenizer over any tokenizer; the offline `generate` reference; a streaming client."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from cometjax.serving.generate import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "stories260K"
PROMPTS = ["Once upon a time", "Lily saw a dog", "Tom and Sue went to the park", "The sun was hot",
           "One day, a little bird", "Ben had a red ball", "The cat sat", "Mom said"]


class ChatTokenizer:
  """A tokenizer with a trivial chat template ("role: content" lines, then "assistant:"); a turn ends at
  EOS or at `end_of_turn_piece`'s token."""

  def __init__(self, tokenizer, end_of_turn_piece: str = "."):
    self._tok = tokenizer
    self.bos_id, self.eos_id, self.vocab_size = tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size
    end = tokenizer.encode(end_of_turn_piece, bos=False)[-1]
    self.end_of_turn_ids = (end,)

  def encode(self, text, bos=True):
    return self._tok.encode(text, bos=bos)

  def decode(self, ids):
    return self._tok.decode(ids)

  def apply_chat_template(self, messages, add_generation_prompt=True):
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return self.encode(text + ("assistant:" if add_generation_prompt else ""))


# Runs `cometjax serve ARGS` with the model's tokenizer wrapped in ChatTokenizer (chat without a template).
_CHAT_LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
from serve_helpers import ChatTokenizer
from cometjax.cli import build_parser
from cometjax.cli.serve import build_engine, serve
from cometjax.serving.http import create_app
args = build_parser().parse_args(["serve"] + sys.argv[1:])
engine, tokenizer, name = build_engine(args)
sys.exit(serve(create_app(engine, ChatTokenizer(tokenizer), model_name=name), args.host, args.port))
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ServerProcess:
  """`with ServerProcess(args) as server:` starts a server, waits for /health, and stops it on exit;
  `stop()` returns the exit code (0 for a graceful shutdown)."""

  def __init__(self, args: list[str], *, chat_tokenizer: bool = False, startup_s: float = 240.0):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.args = [*args, "--port", str(self.port)]
    self.chat_tokenizer, self.startup_s = chat_tokenizer, startup_s
    self.process: subprocess.Popen | None = None

  def __enter__(self) -> "ServerProcess":
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if self.chat_tokenizer:
      command = [sys.executable, "-c", _CHAT_LAUNCHER.format(tests=str(ROOT / "tests")), *self.args]
    else:
      command = [sys.executable, "-m", "cometjax.cli", "serve", *self.args]
    self._log_file = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on it
    self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                    text=True)
    try:
      self._wait_healthy()
    except BaseException:
      self.stop()
      raise
    return self

  def _wait_healthy(self):
    deadline = time.monotonic() + self.startup_s
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.read_log()[-4000:]}")
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.3)
    raise TimeoutError(f"server on {self.url} not healthy after {self.startup_s} s")

  def health(self) -> dict:
    return httpx.get(self.url + "/health", timeout=10).json()

  def stop(self, timeout: float = 30.0) -> int:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    return self.process.returncode

  def read_log(self) -> str:
    self._log_file.seek(0)
    return self._log_file.read()

  def __exit__(self, *exc):
    self.stop()


def offline(stories, prompt_ids, max_tokens, *, stop_ids=(), kv=None, model=None):
  """(text, completion_tokens, finish_reason) that offline greedy `generate` gives, decoded as a whole."""
  tok, model = stories.tokenizer, model or stories.model
  ends = set(model.config.eos_token_ids) | {tok.eos_id} | set(stop_ids)
  # the integer path bit for bit, as the engine runs it (generate's CPU default dequantizes for speed)
  ids = generate(model, [prompt_ids], max_tokens, eos_ids=sorted(ends), kv=kv, dequantize_weights=False).tokens[0]
  stopped = ids[-1] in ends
  shown = ids[:-1] if stopped else ids
  return tok.decode(prompt_ids + shown)[len(tok.decode(prompt_ids)):], len(ids), "stop" if stopped else "length"


def stream_completion(client, prompt, max_tokens, **kwargs):
  stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                     stream_options={"include_usage": True}, **kwargs)
  texts, reasons, usage, ids = [], [], None, set()
  for chunk in stream:
    ids.add(chunk.id)
    if chunk.usage is not None:
      usage = chunk.usage
    for choice in chunk.choices:
      texts.append(choice.text)
      reasons.append(choice.finish_reason)
  return "".join(texts), reasons, usage, ids


def wait_idle(server, timeout: float = 30.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    health = server.health()
    if health["active"] == 0 and health["waiting"] == 0:
      assert health["free_pages"] == health["num_pages"]
      return health
    time.sleep(0.1)
  raise AssertionError(f"requests still held after {timeout} s: {health}")
