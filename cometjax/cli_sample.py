"""`cometjax sample`: draw MNIST samples from the diffusion models, float or quantized, into a PNG grid.

The lead registers it in `cometjax/cli.py` with `add_sample_command(subparsers)`; `args.func(args)` runs it.
Quantized settings calibrate (and for w4a4-quest finetune) on the fly with the default CPU-sized recipe,
which takes a few minutes; `--save-quantized DIR` keeps the result and `--setting DIR` reloads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODEL_CHOICES = ("dit", "cnn")


def _load_model(spec: str):
  from cometjax.models.cnn_ddpm import load_cnn
  from cometjax.models.dit import load_dit
  if spec == "dit":
    return load_dit(), "dit"
  if spec == "cnn":
    return load_cnn(), "cnn"
  path = Path(spec)
  if not (path / "model.safetensors").exists():
    raise SystemExit(f"--model must be 'dit', 'cnn' or a folder with model.safetensors + config.json, got {spec!r}")
  from safetensors.numpy import load_file
  names = set(load_file(str(path / "model.safetensors")))
  if "label_emb.weight" in names:
    return load_dit(path), "dit"
  if "gt.frequencies" in names:
    return load_cnn(path), "cnn"
  raise SystemExit(f"{path}: not a known diffusion checkpoint (no label_emb.weight / gt.frequencies)")


def save_quantized(model, quant, kind: str, setting: str, folder) -> None:
  """Write the quantized model's full NNX state (safetensors) + the settings that rebuild its graph."""
  import dataclasses

  import numpy as np
  from flax import nnx
  from safetensors.numpy import save_file
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  state = nnx.state(model)
  tensors = {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}
  save_file(tensors, str(folder / "quantized.safetensors"))
  (folder / "quantized.json").write_text(json.dumps(
    {"kind": kind, "setting": setting, "quant": dataclasses.asdict(quant)}, indent=2))


def load_quantized(folder, model_spec: str):
  """Rebuild a model saved by `save_quantized`: base checkpoint + quantizers + the saved state."""
  from flax import nnx
  from safetensors.numpy import load_file

  from cometjax.quest_quant import DiffusionQuantConfig, attach_quantizers, to_integer
  folder = Path(folder)
  meta = json.loads((folder / "quantized.json").read_text())
  raw = meta["quant"]
  raw["keep_float"] = tuple(raw.get("keep_float", ()))
  raw["act_bits_overrides"] = tuple((pattern, bits) for pattern, bits in raw.get("act_bits_overrides", ()))
  quant = DiffusionQuantConfig(**raw)
  model, kind = _load_model(model_spec if model_spec in MODEL_CHOICES or Path(model_spec).exists() else meta["kind"])
  if kind != meta["kind"]:
    raise SystemExit(f"{folder} holds a quantized {meta['kind']!r} model, but --model gave {kind!r}")
  attach_quantizers(model, quant)
  to_integer(model)
  tensors = load_file(str(folder / "quantized.safetensors"))
  state = nnx.state(model)
  flat = []
  for path, variable in nnx.to_flat_state(state):
    name = ".".join(str(p) for p in path)
    if name not in tensors:
      raise SystemExit(f"{folder}: tensor {name} missing from quantized.safetensors")
    variable.set_value(tensors[name])
    flat.append((path, variable))
  nnx.update(model, nnx.from_flat_state(flat))
  return model, kind, quant


def run_sample(args) -> Path:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from calib.quest import SETTINGS, format_report, quantize_for_setting
  from cometjax.diffusion import ddim_sample, ddpm_sample, image_grid, schedule_for, write_png

  if args.count < 1:
    raise SystemExit(f"--count must be >= 1, got {args.count}")
  if args.setting in SETTINGS:
    model, kind = _load_model(args.model)
    schedule = schedule_for(model)
    model, quant, report = quantize_for_setting(model, schedule, args.setting, progress=not args.quiet)
    if "quest" in report and not args.quiet:
      print(format_report(report["quest"]))
    if args.save_quantized and quant is not None:
      save_quantized(model, quant, kind, args.setting, args.save_quantized)
  elif Path(args.setting).is_dir():
    model, kind, quant = load_quantized(args.setting, args.model)
    schedule = schedule_for(model)
  else:
    raise SystemExit(f"--setting must be one of {SETTINGS} or a folder written by --save-quantized, "
                     f"got {args.setting!r}")

  labels = None
  if kind == "dit":
    classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(10))
    if any(not 0 <= c <= 9 for c in classes):
      raise SystemExit(f"--classes must be digits 0..9 separated by commas, got {args.classes!r}")
    labels = jnp.asarray([classes[i % len(classes)] for i in range(args.count)], jnp.int32)
  elif args.classes:
    raise SystemExit("--classes only applies to the class-conditional DiT (--model dit)")
  key = jax.random.key(args.seed)
  noise_key, step_key = jax.random.split(key)
  noise = jax.random.normal(noise_key, (args.count, 1, 28, 28))
  group_fn = quant.timestep_group if quant is not None else None
  if args.steps is None:  # the checkpoint's own sampler: ancestral DDPM over all timesteps
    samples = ddpm_sample(model, schedule, noise, labels, key=step_key, group_fn=group_fn)
  else:
    samples = ddim_sample(model, schedule, noise, labels, steps=args.steps, group_fn=group_fn)
  pixels = np.asarray(schedule.to_unit(samples))
  out = Path(args.out)
  write_png(out, image_grid(pixels, columns=min(10, args.count)))
  if not args.quiet:
    print(f"wrote {args.count} samples to {out}")
  return out


def add_sample_command(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser("sample", help="sample MNIST digits from the diffusion models (float or quantized)")
  parser.add_argument("--model", default="dit", help="dit | cnn | a checkpoint folder (default: dit)")
  parser.add_argument("--setting", default="fp",
                      help="fp | w8a8 | w4a8 | w4a4-ptq | w4a4-quest | a folder from --save-quantized")
  parser.add_argument("--classes", default=None, help="DiT only: comma-separated digits, cycled (default 0..9)")
  parser.add_argument("--count", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None,
                      help="DDIM steps (default: the checkpoint's DDPM sampler over all 1000 steps)")
  parser.add_argument("--out", default="samples.png", help="output PNG grid")
  parser.add_argument("--save-quantized", default=None, help="folder to keep the quantized model in")
  parser.add_argument("--quiet", action="store_true")
  parser.set_defaults(func=run_sample)
  return parser


def main(argv=None):
  parser = argparse.ArgumentParser(prog="cometjax")
  add_sample_command(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main()
