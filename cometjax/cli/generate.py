"""`cometjax generate`: jitted prefill + decode from a prompt, printing the text and tokens/s."""

from __future__ import annotations

import argparse
import json
import sys

from cometjax.cli.common import (DEFAULT_MODEL_HELP, add_kv_arg, add_model_args, at_least, check_model_paths,
                                 load_model)
from cometjax.errors import UsageError


def add_command(sub) -> argparse.ArgumentParser:
  g = sub.add_parser("generate", help="generate text (jitted prefill + decode) and report tokens/s")
  add_model_args(g, DEFAULT_MODEL_HELP)
  g.add_argument("--prompt", default="", help="prompt text, tokenized with the tokenizer's own BOS rule; empty "
                 "(default) starts from BOS alone")
  g.add_argument("--chat", action="store_true",
                 help="send --prompt as one user turn through the model's chat template and stop at the "
                      "template's end-of-turn token")
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
  g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
  g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (and the builtin model's weights)")
  g.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
  g.add_argument("--truncate-prompt", action="store_true",
                 help="drop the oldest prompt tokens when prompt + --max-new-tokens exceeds the model's context "
                      "(default: refuse)")
  add_kv_arg(g)
  g.add_argument("--no-warmup", dest="warmup", action="store_false",
                 help="time the first (compiling) call instead of a warmed-up second call")
  g.add_argument("--json", action="store_true",
                 help="print one JSON object as the last line: token_ids, text, timings")
  g.add_argument("--verbose", action="store_true", help="with --json, also print the text")
  g.set_defaults(func=run)
  return g


def _prompt(args, model, tokenizer) -> tuple[list[int], tuple[int, ...] | None]:
  """(prompt ids, stop ids or None for the model's EOS) for --prompt / --chat."""
  if tokenizer is None and (args.prompt or args.chat):
    raise UsageError("--prompt", "text (and --chat) needs a tokenizer (this model has none); leave --prompt "
                     "empty to start from BOS, or pass --tokenizer")
  if args.chat:
    return tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]), tokenizer.end_of_turn_ids
  if args.prompt:
    return tokenizer.encode(args.prompt), None
  return [model.config.bos_token_id if model.config.bos_token_id is not None else 1], None


def check_args(args) -> None:
  check_model_paths(args)
  at_least("--max-new-tokens", args.max_new_tokens, 1)
  at_least("--temperature", args.temperature, 0.0)
  at_least("--top-k", args.top_k, 0)
  if not 0.0 < args.top_p <= 1.0:
    raise UsageError("--top-p", f"must be in (0, 1], got {args.top_p}")


def fit_prompt(args, prompt: list[int], config) -> list[int]:
  """The prompt, refused (or with --truncate-prompt cut) when prompt + --max-new-tokens exceeds the context."""
  from cometjax.errors import InputError
  from cometjax.serving.limits import fit_context
  try:
    return fit_context(prompt, args.max_new_tokens, config.max_position_embeddings,
                       truncate="left" if args.truncate_prompt else None)
  except InputError as e:
    flag = "--max-new-tokens" if args.max_new_tokens >= config.max_position_embeddings else "--prompt"
    raise UsageError(flag, str(e).replace("truncate='left'", "--truncate-prompt")) from None


def run(args) -> int:
  check_args(args)
  import jax

  from cometjax.serving.generate import SamplingConfig, generate

  model, tokenizer, kv = load_model(args)
  prompt, eos_ids = _prompt(args, model, tokenizer)
  prompt = fit_prompt(args, prompt, model.config)
  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  key = jax.random.key(args.seed)
  kwargs = dict(sampling=sampling, key=key, stop_at_eos=not args.no_stop, kv=kv,
                eos_ids=() if args.no_stop else eos_ids)
  result = generate(model, [prompt], args.max_new_tokens, warmup=args.warmup, **kwargs)
  ids = result.tokens[0]
  text = tokenizer.decode(ids) if tokenizer is not None else None
  t = result.timings()
  if not args.json or args.verbose:
    print(text if text is not None else f"(no tokenizer) token ids: {ids}")
  print(f"prefill: {t['prompt_tokens']} tokens in {t['prefill_s'] * 1e3:.1f} ms "
        f"({t['prefill_tokens_per_s']:.1f} tokens/s); decode: {len(ids)} tokens in {t['decode_s'] * 1e3:.1f} ms "
        f"({t['decode_tokens_per_s']:.1f} tokens/s)"
        + (f"; warm-up call (compiling) {t['warmup_s']:.2f} s" if t["warmup_s"] is not None else ""),
        file=sys.stderr if args.json else sys.stdout)
  if args.json:
    print(json.dumps({"model": args.model, "prompt_ids": prompt, "token_ids": ids, "text": text, **t}))
  return 0
