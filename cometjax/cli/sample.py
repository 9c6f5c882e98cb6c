"""`cometjax sample`: draw MNIST samples from the diffusion models, float or quantized, into a PNG grid.

Quantized settings calibrate (and for w4a4-quest finetune) on the fly with the default CPU-sized recipe,
printing the plan and its expected time first (w4a4-quest on the DiT: about 1.5 minutes on 2 idle CPU cores) and
progress bars while it runs; `--save-quantized DIR` keeps the result and `--setting DIR` reloads it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cometjax.cli.common import at_least, check_output_dir, check_output_file, int_list
from cometjax.errors import UsageError

MODEL_CHOICES = ("dit", "cnn")
SETTING_CHOICES = "fp | w8a8 | w4a8 | w4a4-ptq | w4a4-quest | a folder from --save-quantized"


def add_command(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser("sample", help="sample MNIST digits from the diffusion models (float or quantized)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="dit", help="dit | cnn | a checkpoint folder (default: dit)")
  parser.add_argument("--setting", default="fp", help=SETTING_CHOICES)
  parser.add_argument("--classes", default=None, help="DiT only: comma-separated digits, cycled (default 0..9)")
  parser.add_argument("--count", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=None,
                      help="DDIM steps (default: the checkpoint's DDPM sampler over all 1000 steps)")
  parser.add_argument("--out", default="samples.png", help="output PNG grid")
  parser.add_argument("--save-quantized", default=None, help="folder to keep the quantized model in (new or empty)")
  parser.add_argument("--force", action="store_true", help="write --save-quantized into a non-empty folder")
  parser.add_argument("--quiet", action="store_true")
  parser.set_defaults(func=run)
  return parser


def _quantized_model(args):
  """(model, kind, quant config or None) for --model / --setting."""
  from calib.quest import SETTINGS, describe_plan, format_report, quantize_for_setting
  from cometjax.checkpoint.diffusion import load_diffusion, load_quantized_diffusion, save_quantized_diffusion
  from cometjax.diffusion.sampling import schedule_for

  if args.setting in SETTINGS:
    model, kind = load_diffusion(args.model)
    if args.setting != "fp" and not args.quiet:
      print(describe_plan(kind, args.setting), flush=True)
    start = time.time()
    model, quant, report = quantize_for_setting(model, schedule_for(model), args.setting, progress=not args.quiet)
    if args.setting != "fp" and not args.quiet:
      print(f"quantized in {time.time() - start:.0f}s", flush=True)
    if "quest" in report and not args.quiet:
      print(format_report(report["quest"]))
    if args.save_quantized and quant is not None:
      save_quantized_diffusion(model, quant, kind, args.setting, args.save_quantized)
    return model, kind, quant
  if Path(args.setting).is_dir():
    return load_quantized_diffusion(args.setting, args.model)
  raise UsageError("--setting", f"must be one of {SETTINGS} or a folder written by --save-quantized, "
                                f"got {args.setting!r}")


def check_args(args) -> list[int] | None:
  """Everything checkable before a model loads; returns the --classes digits (or None)."""
  from calib.quest import SETTINGS
  at_least("--count", args.count, 1)
  at_least("--steps", args.steps, 1, allow_none=True)
  if args.model not in ("dit", "cnn") and not Path(args.model).is_dir():
    raise UsageError("--model", f"must be dit, cnn or a checkpoint folder, got {args.model!r}")
  if args.setting not in SETTINGS and not Path(args.setting).is_dir():
    raise UsageError("--setting", f"must be one of {SETTINGS} or a folder written by --save-quantized, "
                                  f"got {args.setting!r}")
  check_output_file("--out", args.out)
  if args.save_quantized is not None:
    if args.setting not in SETTINGS or args.setting == "fp":
      raise UsageError("--save-quantized", "applies to a quantized --setting (w8a8, w4a8, w4a4-ptq, w4a4-quest)")
    check_output_dir("--save-quantized", args.save_quantized,
                     (args.model if Path(args.model).exists() else None,), args.force)
  if args.classes is None:
    return None
  if args.model == "cnn":
    raise UsageError("--classes", "only applies to the class-conditional DiT (--model dit)")
  classes = int_list("--classes", args.classes)
  if any(not 0 <= c <= 9 for c in classes):
    raise UsageError("--classes", f"must be digits 0..9 separated by commas, got {args.classes!r}")
  return classes


def run(args) -> int:
  classes = check_args(args)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cometjax.diffusion.images import image_grid, write_png
  from cometjax.diffusion.sampling import ddim_sample, ddpm_sample, schedule_for

  model, kind, quant = _quantized_model(args)
  schedule = schedule_for(model)
  labels = None
  if kind == "dit":
    classes = classes or list(range(10))
    labels = jnp.asarray([classes[i % len(classes)] for i in range(args.count)], jnp.int32)
  elif classes:
    raise UsageError("--classes", "only applies to the class-conditional DiT (--model dit)")
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
  return 0
