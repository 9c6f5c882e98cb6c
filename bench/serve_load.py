"""Load on `cometjax serve`: N concurrent streaming clients on loopback; time to first token, inter-token
latency and total tokens/s for each N.

    python bench/serve_load.py                       # starts a server on stories260K, clients 1 and 8
    python bench/serve_load.py --url http://127.0.0.1:8000 --model-name NAME   # an already running server
    python bench/serve_load.py --smoke               # a few seconds: shows the script runs (CI)

Each client sends `--requests` streaming completions one after another (greedy, `--max-tokens` each,
prompts taken in turn from a fixed list); a phase ends when every client is done or after
`--phase-timeout-s`. One request warms the server up before the first phase. Time to first token: from
sending the request to its first text chunk. Inter-token latency: the gaps between a request's chunks
(a chunk holds one token, or more when the detokenizer held text back). Total tokens/s: completion tokens
of the phase (from each stream's usage) over the phase's wall time. Results: `bench/results/
serve_load_<device>.json` (or --out) with date, device, jax version and commit, and the throughput of
the largest N over N = 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, device_tag, run_metadata, write_json  # noqa: E402
from cometjax.data import data_path  # noqa: E402

PROMPTS = ["Once upon a time", "Lily saw a dog", "Tom and Sue went to the park", "The sun was hot",
           "One day, a little bird", "Ben had a red ball", "The cat sat", "Mom said"]


async def _one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
  start = time.perf_counter()
  arrivals, tokens = [], 0
  async with http.stream("POST", "/v1/completions", json=body) as response:
    if response.status_code != 200:
      raise RuntimeError(f"server answered {response.status_code}: {await response.aread()}")
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      event = json.loads(line[6:])
      if "error" in event:
        raise RuntimeError(f"server error mid-stream: {event['error']}")
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
      if any(c.get("text") for c in event["choices"]):
        arrivals.append(time.perf_counter())
  if not arrivals:
    raise RuntimeError(f"no text came back for prompt {prompt!r}")
  return {"ttft_s": arrivals[0] - start, "gaps_s": np.diff(arrivals).tolist(), "tokens": tokens}


async def _client(http, model, index, requests, max_tokens, deadline) -> list[dict]:
  done = []
  for r in range(requests):
    if time.perf_counter() > deadline:
      break
    done.append(await _one_request(http, model, PROMPTS[(index + r) % len(PROMPTS)], max_tokens))
  return done


def _percentiles(values) -> dict:
  if not len(values):
    return {"p50": None, "p90": None, "p99": None}
  p50, p90, p99 = np.percentile(np.asarray(values) * 1e3, [50, 90, 99])
  return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


async def _phase(url, model, clients, requests, max_tokens, timeout_s) -> dict:
  limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
  async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
    start = time.perf_counter()
    per_client = await asyncio.gather(*[_client(http, model, i, requests, max_tokens, start + timeout_s)
                                        for i in range(clients)])
    wall = time.perf_counter() - start
  results = [r for rs in per_client for r in rs]
  tokens = sum(r["tokens"] for r in results)
  return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": wall,
          "tokens_per_s": tokens / wall, "ttft_ms": _percentiles([r["ttft_s"] for r in results]),
          "itl_ms": _percentiles([g for r in results for g in r["gaps_s"]])}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Server:
  """`cometjax serve` in a subprocess, stopped with SIGTERM (then SIGKILL) however the bench ends."""

  def __init__(self, serve_args: list[str], startup_s: float = 300.0):
    self.url = f"http://127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "cometjax.cli", "serve", *serve_args, "--port", self.url.rsplit(":", 1)[1]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline and self.process.poll() is None:
      try:
        if httpx.get(self.url + "/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        time.sleep(0.3)
    self.stop()
    raise RuntimeError(f"`cometjax serve {' '.join(serve_args)}` did not become healthy")

  def stop(self):
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--url", default=None, help="a running server; default: start one on --model")
  p.add_argument("--model", default=None, help="model to serve (default: stories260K from the shared data)")
  p.add_argument("--model-name", default="stories260K", help="the served model's name")
  p.add_argument("--clients", default="1,8", help="comma-separated client counts, one phase each")
  p.add_argument("--requests", type=int, default=4, help="requests per client per phase")
  p.add_argument("--max-tokens", type=int, default=128)
  p.add_argument("--slots", type=int, default=8, help="engine slots of the started server")
  p.add_argument("--max-len", type=int, default=256, help="engine max_len of the started server")
  p.add_argument("--phase-timeout-s", type=float, default=300.0, help="a phase stops sending after this")
  p.add_argument("--smoke", action="store_true", help="clients 1,4; 2 requests of 16 tokens each")
  p.add_argument("--out", default=None, help="output JSON (default bench/results/serve_load_<device>.json)")
  args = p.parse_args(argv)
  if args.smoke:
    args.clients, args.requests, args.max_tokens, args.max_len = "1,4", 2, 16, 128
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  clients = [int(c) for c in args.clients.split(",")]
  server = None
  if args.url is None:
    model = args.model or str(data_path("llama", "stories260K", "hf"))
    server = _Server(["--model", model, "--model-name", args.model_name, "--slots", str(args.slots),
                      "--max-len", str(args.max_len)])
  url = args.url or server.url
  try:
    asyncio.run(_phase(url, args.model_name, 1, 1, args.max_tokens, args.phase_timeout_s))  # warm-up
    phases = [asyncio.run(_phase(url, args.model_name, n, args.requests, args.max_tokens, args.phase_timeout_s))
              for n in clients]
  finally:
    if server is not None:
      server.stop()
  by_clients = {p["clients"]: p for p in phases}
  ratio = (by_clients[max(clients)]["tokens_per_s"] / by_clients[1]["tokens_per_s"]) if 1 in by_clients else None
  report = {**run_metadata(), "smoke": args.smoke, "url": args.url or "started by the bench",
            "model": args.model_name, "server": {"slots": args.slots, "max_len": args.max_len} if server else None,
            "requests_per_client": args.requests, "max_tokens": args.max_tokens, "phases": phases,
            "throughput_ratio_max_clients_vs_1": ratio}
  out = pathlib.Path(args.out) if args.out else RESULTS / f"serve_load_{device_tag()}.json"
  write_json(out, report)
  for p in phases:
    print(f"{p['clients']:>3} clients: {p['tokens_per_s']:8.1f} tokens/s, TTFT p50 {p['ttft_ms']['p50']:.1f} ms "
          f"p99 {p['ttft_ms']['p99']:.1f} ms, ITL p50 {p['itl_ms']['p50']:.2f} ms p99 {p['itl_ms']['p99']:.2f} ms")
  if ratio is not None:
    print(f"throughput {max(clients)} clients / 1 client: {ratio:.2f}x  -> {out}")
  return report


if __name__ == "__main__":
  main()
