"""`cometjax` command line: generate, eval-ppl, quantize, sample, serve. One module per subcommand; building the
parser imports no jax, so `cometjax --help` is instant."""

from __future__ import annotations

import argparse
import sys

from cometjax.cli import eval_ppl, generate, quantize, sample, serve
from cometjax.compile_cache import enable_compilation_cache


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="cometjax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for command in (generate, eval_ppl, quantize, sample, serve):
    command.add_command(sub)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  enable_compilation_cache()  # every command compiles; a second run reuses the cache (docs: README)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError) as e:  # named, user-facing errors (CheckpointError is a ValueError)
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
