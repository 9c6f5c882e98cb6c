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
    command_parser = command.add_command(sub)
    command_parser.set_defaults(command_parser=command_parser)
  return parser


def main(argv=None) -> int:
  """Runs one subcommand; 0 on success, 2 on a user error (one line `error: <flag>: <what is wrong>`)."""
  args, unknown = build_parser().parse_known_args(argv)
  if unknown:  # the subcommand's usage, not the top level's
    args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  enable_compilation_cache()  # every command compiles; a second run reuses the cache (docs: README)
  try:
    status = args.func(args)
  except (ValueError, OSError) as e:  # named, user-facing errors (CheckpointError, UsageError are ValueErrors)
    print(f"error: {e}", file=sys.stderr)
    return 2
  return status if isinstance(status, int) else 0


if __name__ == "__main__":
  sys.exit(main())
