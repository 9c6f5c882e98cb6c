"""`cometjax quantize` end to end on stories260K, and the saved directory used without the checkpoint."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_data

pytestmark = pytest.mark.realdata


def _parser():
  from cometjax.cli.quantize import add_command as add_quantize_command
  parser = argparse.ArgumentParser()
  add_quantize_command(parser.add_subparsers(dest="command", required=True))
  return parser


@pytest.mark.slow
def test_quantize_cli_w4ax_kv4_saves_a_loadable_model(tmp_path, capsys):
  from cometjax.checkpoint import load
  model = require_data("llama", "stories260K", "hf")
  text = require_data("text", "tinystories_val.txt")
  out = tmp_path / "q"
  args = _parser().parse_args(["quantize", "--model", str(model), "--calib-text", str(text), "--preset",
                               "w4ax-kv4", "--calib-documents", "10", "--max-calib-windows", "4",
                               "--out", str(out), "--no-progress", "--json"])
  assert args.func(args) == 0
  assert '"int4_block_fraction"' in capsys.readouterr().out
  loaded = load(out)  # dispatches to cometjax.quantize.load_quantized
  assert loaded.quant_config.name == "w4ax-kv4" and loaded.quant_config.kv is not None
  assert loaded.tokenizer is not None
  story = text.read_text().split("<|endoftext|>")[300].strip()
  ids = jnp.asarray([loaded.tokenizer.encode(story, bos=True)[:65]])
  logits, _ = loaded.model(ids[:, :-1])  # eager: no compilation
  logp = jax.nn.log_softmax(logits, axis=-1)
  ppl = float(jnp.exp(-jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))))
  assert np.isfinite(ppl) and ppl < 20


def test_quantize_cli_errors(tmp_path):
  model = require_data("llama", "stories260K", "hf")
  parser = _parser()
  args = parser.parse_args(["quantize", "--model", str(model), "--preset", "w4ax", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="--calib-text: missing"):
    args.func(args)
  args = parser.parse_args(["quantize", "--model", str(model), "--preset", "nope", "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    args.func(args)
  args = parser.parse_args(["quantize", "--model", str(model), "--preset", "w4a16", "--int8-fraction", "0.5",
                            "--out", str(tmp_path)])
  with pytest.raises(ValueError, match="A16"):
    args.func(args)


def test_quantize_cli_format_flags_override_the_preset():
  from cometjax.cli.quantize import config_from_args
  args = _parser().parse_args(["quantize", "--model", "m", "--out", "o", "--preset", "w4ax-kv4",
                               "--weight-zero-point", "asymmetric", "--scale-dtype", "bfloat16",
                               "--rotate-int4", "block", "--embedding-bits", "8"])
  config = config_from_args(args)
  assert not config.weights.symmetric and config.weights.scale_dtype == "bfloat16"
  assert config.activations.rotate_int4 == "block" and config.embedding_bits == 8
  args = _parser().parse_args(["quantize", "--model", "m", "--out", "o", "--preset", "w4ax-kv4",
                               "--weight-zero-point", "symmetric", "--rotate-int4", "none", "--embedding-bits",
                               "float"])
  config = config_from_args(args)
  assert config.weights.symmetric and config.activations.rotate_int4 is False and config.embedding_bits is None
  integer = config_from_args(_parser().parse_args(
      ["quantize", "--model", "m", "--out", "o", "--preset", "w4ax-kv4", "--weight-zero-point", "integer"]))
  assert not integer.weights.symmetric and integer.weights.integer_zero
  # symmetric over a preset with integer zero points turns them off rather than failing the config check
  args = _parser().parse_args(["quantize", "--model", "m", "--out", "o", "--preset", "w4ax-kv4",
                               "--weight-zero-point", "symmetric"])
  assert not config_from_args(args).weights.integer_zero
