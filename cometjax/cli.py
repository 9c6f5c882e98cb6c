"""`cometjax` command line: generate, eval-ppl, quantize, sample."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

BUILTIN_MODEL = "builtin:tiny"
DTYPES = ("float32", "bfloat16")


def _load_model(args):
  """(model, tokenizer or None, KV setting) for --model: a HF dir, a llama2.c .bin, a quantized dir, or
  the builtin random model. The KV setting is --kv, else the quantized dir's own, else float."""
  import jax.numpy as jnp

  dtype = jnp.dtype(args.dtype)
  if args.model == BUILTIN_MODEL:
    from cometjax.models.llama import TINY_CONFIG, init_llama
    # stories260K's shape with an untied random head, so the random model's tokens vary
    config = TINY_CONFIG.replace(dtype=dtype, tie_word_embeddings=False)
    return init_llama(config, seed=args.seed), None, _kv_config(args.kv)
  from cometjax.models.loaders import load
  loaded = load(args.model, tokenizer=args.tokenizer, dtype=dtype)
  kv = _kv_config(args.kv)
  if args.kv is None and loaded.quant_config is not None:
    kv = loaded.quant_config.kv
  return loaded.model, loaded.tokenizer, kv


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None):
  p.add_argument("--model", default=default_model, required=default_model is None,
                 help="Hugging Face model directory, llama2.c .bin file"
                 + (f", or {BUILTIN_MODEL} (a small random Llama; the default)" if default_model else ""))
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer (HF dir, SentencePiece .model or llama2.c .bin); default: found beside the model")
  p.add_argument("--dtype", default="float32", choices=DTYPES)


def _kv_config(name: str | None):
  from cometjax.kvcache import KVQuantConfig
  return None if name in (None, "none") else KVQuantConfig(k_mode=name)


def _add_kv_arg(p: argparse.ArgumentParser):
  from cometjax.kvcache import K_MODES
  p.add_argument("--kv", default=None, choices=("none",) + K_MODES,
                 help="KV cache: none (float) or INT4 with this K layout (channel: K per channel over 32-token "
                      "groups, the most accurate). Default: a quantized model's own setting, else none")


def cmd_generate(args) -> int:
  import jax
  from cometjax.generate import SamplingConfig, generate

  model, tokenizer, kv = _load_model(args)
  bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
  if args.prompt:
    if tokenizer is None:
      raise SystemExit("error: --prompt text needs a tokenizer (this model has none); leave --prompt empty "
                       "to start from BOS, or pass --tokenizer")
    prompt = tokenizer.encode(args.prompt, bos=True)
  else:
    prompt = [bos]
  sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  key = jax.random.key(args.seed)
  kwargs = dict(sampling=sampling, key=key, stop_at_eos=not args.no_stop, kv=kv)
  if args.warmup:
    generate(model, [prompt], args.max_new_tokens, **kwargs)  # compiles this shape bucket
  result = generate(model, [prompt], args.max_new_tokens, **kwargs)
  ids = result.tokens[0]
  text = tokenizer.decode(ids) if tokenizer is not None else None
  t = result.timings()
  if not args.json or args.verbose:
    print(text if text is not None else f"(no tokenizer) token ids: {ids}")
  print(f"prefill: {t['prompt_tokens']} tokens in {t['prefill_s'] * 1e3:.1f} ms "
        f"({t['prefill_tokens_per_s']:.1f} tokens/s); decode: {len(ids)} tokens in {t['decode_s'] * 1e3:.1f} ms "
        f"({t['decode_tokens_per_s']:.1f} tokens/s)", file=sys.stderr if args.json else sys.stdout)
  if args.json:
    print(json.dumps({"model": args.model, "prompt_ids": prompt, "token_ids": ids, "text": text, **t}))
  return 0


def cmd_eval_ppl(args) -> int:
  from pathlib import Path
  from cometjax.perplexity import perplexity

  model, tokenizer, kv = _load_model(args)
  if tokenizer is None:
    raise SystemExit(f"error: eval-ppl needs a tokenizer; none was found for {args.model} (pass --tokenizer)")
  text_path = Path(args.text)
  if not text_path.is_file():
    raise SystemExit(f"error: --text file not found: {text_path}")
  result = perplexity(model, tokenizer, text_path.read_text(encoding="utf-8"), window=args.window,
                      separator=args.separator or None, per_document=args.per_document,
                      batch_size=args.batch_size, max_documents=args.max_documents, kv=kv,
                      progress=not args.json)
  print(f"perplexity {result.ppl:.4f} over {result.num_tokens} tokens "
        f"({result.num_windows} windows of {args.window}, {result.num_documents} documents)")
  if args.json:
    kv_json = None if kv is None else kv.as_dict()
    print(json.dumps({"model": args.model, "text": str(text_path), "window": args.window, "kv": kv_json,
                      "per_document": args.per_document, **result.as_dict()}))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cometjax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="generate text (jitted prefill + decode) and report tokens/s")
  _add_model_args(g, BUILTIN_MODEL)
  g.add_argument("--prompt", default="", help="prompt text; empty (default) starts from BOS alone")
  g.add_argument("--max-new-tokens", type=int, default=128)
  g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
  g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
  g.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (and the builtin model's weights)")
  g.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
  _add_kv_arg(g)
  g.add_argument("--no-warmup", dest="warmup", action="store_false",
                 help="time the first (compiling) call instead of a warmed-up second call")
  g.add_argument("--json", action="store_true",
                 help="print one JSON object as the last line: token_ids, text, timings")
  g.add_argument("--verbose", action="store_true", help="with --json, also print the text")
  g.set_defaults(func=cmd_generate)

  from cometjax import perplexity as ppl_module
  e = sub.add_parser("eval-ppl", help="perplexity of a text file",
                     description="Perplexity of a text file.\n\n" + textwrap.dedent(ppl_module.__doc__),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  _add_model_args(e, None)
  e.add_argument("--text", required=True, help="UTF-8 text file")
  e.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
  e.add_argument("--separator", default=ppl_module.DEFAULT_SEPARATOR,
                 help="document separator (default <|endoftext|>; '' = the file is one document)")
  e.add_argument("--per-document", action="store_true", help="window each document separately")
  e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
  e.add_argument("--max-documents", type=int, default=None, help="only the first N documents")
  _add_kv_arg(e)
  e.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
  e.set_defaults(func=cmd_eval_ppl)

  for register in _extra_commands():
    register(sub)
  return parser


def _extra_commands():
  """Subcommands defined beside their feature."""
  from cometjax.cli_quantize import add_quantize_command
  from cometjax.cli_sample import add_sample_command
  return [add_quantize_command, add_sample_command]


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError) as e:  # named, user-facing errors (CheckpointError is a ValueError)
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
