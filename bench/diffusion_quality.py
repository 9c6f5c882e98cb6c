"""Sample quality of the MNIST diffusion models under W8A8 / W4A8 / W4A4 (PTQ) / W4A4 (QuEST).

For each model (mnist_dit, class-conditional; mnist_cnn, unconditional) and setting:
  - class_accuracy: fraction of DiT samples that our MNIST classifier assigns to the conditioning class
    (null for the CNN);
  - frechet: Frechet distance between classifier features (128-d penultimate layer) of the samples and
    of held-out real MNIST test images (few samples -> biased upwards; compare within a column);
  - psnr: PSNR (dB, pixels in [0,1]) of each sample against the float model's sample from the same noise.
The classifier is a small Flax CNN trained here on the first 8000 MNIST test images; its accuracy on the
other 2000 is reported. The DiT samples with its checkpoint's own sampler (ancestral DDPM, 1000 steps) by
default, the CNN with DDIM (`--steps` 25, `--eta` 1.0); either way the same initial and per-step noise in every
setting, so PSNR compares like with like. Quantized settings run real integer layers (packed INT4/INT8 weights,
int8 activations). One calibration set per model (the float model's paths) serves every setting and seed.

Writes bench/results/diffusion_quality.json, .md and one PNG grid per model and setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from calib.adaround import build_calibration_set, with_other_labels  # noqa: E402
from calib.quest import SETTINGS, default_recipe, format_report, quantize_for_setting  # noqa: E402
from cometjax.diffusion.sampling import ddim_sample, ddpm_sample, schedule_for  # noqa: E402
from cometjax.diffusion.images import image_grid, write_png  # noqa: E402
from cometjax.diffusion.evaluation import load_mnist_test, noise_prediction_loss  # noqa: E402
from cometjax.checkpoint.diffusion import load_cnn  # noqa: E402
from cometjax.checkpoint.diffusion import load_dit  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# ----------------------------------------------------------------------------------------------
# Classifier


class MnistClassifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.dense = nnx.Linear(64 * 7 * 7, 128, rngs=rngs)
    self.head = nnx.Linear(128, 10, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:  # [B,28,28] in [0,1] -> [B,128]
    h = x[..., None]
    h = nnx.max_pool(jax.nn.relu(self.conv1(h)), (2, 2), (2, 2))
    h = nnx.max_pool(jax.nn.relu(self.conv2(h)), (2, 2), (2, 2))
    return jax.nn.relu(self.dense(h.reshape(h.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 4, batch_size: int = 128,
                     seed: int = 0) -> MnistClassifier:
  model = MnistClassifier(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  x_all = images.astype(np.float32) / 255.0
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      rows = order[start:start + batch_size]
      # small random shifts make it robust to generated digits that sit off-centre
      shift = rng.integers(-2, 3, size=2)
      x = np.roll(x_all[rows], tuple(shift), axis=(1, 2))
      step(model, optimizer, jnp.asarray(x), jnp.asarray(labels[rows].astype(np.int32)))
  return model


@nnx.jit
def _classify(model, x):
  return model(x).argmax(-1), model.features(x)


def classify(model: MnistClassifier, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """pixels [N,28,28] in [0,1] -> (predicted class [N], features [N,128])."""
  preds, feats = [], []
  for start in range(0, len(pixels), 500):
    p, f = _classify(model, jnp.asarray(pixels[start:start + 500], jnp.float32))
    preds.append(np.asarray(p))
    feats.append(np.asarray(f))
  return np.concatenate(preds), np.concatenate(feats)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  from scipy import linalg
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
  covmean = covmean.real
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def psnr(samples: np.ndarray, reference: np.ndarray) -> float | None:
  mse = float(((samples - reference) ** 2).mean())
  return None if mse == 0 else float(10 * np.log10(1.0 / mse))


# ----------------------------------------------------------------------------------------------


def git_commit() -> str:
  try:
    return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
  except Exception:  # noqa: BLE001
    return "unknown"


def smoke_recipe(kind: str):
  """The default recipe shrunk to seconds (CI): same steps, tiny calibration and training budgets."""
  recipe = default_recipe(kind)
  return dataclasses.replace(
    recipe, calibration=dataclasses.replace(recipe.calibration, num_trajectories=4, steps=4, num_samples=16,
                                            record_samples=8),
    adaround=dataclasses.replace(recipe.adaround, iterations=2, batch_samples=4),
    quest=dataclasses.replace(recipe.quest, steps=3, batch_size=4))


def shared_calibration_set(loader, recipe, runs, progress: bool):
  """(calibration set, seconds) that every quantized setting of one model reuses (None if only fp): the float
  model's paths do not depend on the setting or the finetuning seed, so they run once per model."""
  if all(setting == "fp" for setting, _ in runs):
    return None, None
  t0 = time.time()
  model = loader()
  schedule = schedule_for(model)
  calib = build_calibration_set(model, schedule, recipe.calibration, progress)
  if any(setting == "w4a4-quest" for setting, _ in runs) and recipe.quest.needs_other_labels:
    calib = with_other_labels(model, schedule, calib, seed=recipe.calibration.seed)
  seconds = round(time.time() - t0, 1)
  print(f"calibration set: {len(calib)} states from {recipe.calibration.num_trajectories} "
        f"{recipe.calibration.sampler.upper()} paths ({seconds:.0f}s)", flush=True)
  return calib, seconds


def sampler_for(args, kind: str) -> str:
  """"ddpm" or "ddim": the sampler that `args` picks for a model kind ("dit" / "cnn")."""
  return args.dit_sampler if kind == "dit" else args.cnn_sampler


def sampler_name(args, kind: str) -> str:
  if sampler_for(args, kind) == "ddpm":
    return "DDPM, 1000 steps (the checkpoint's own)"
  return f"DDIM eta={args.eta}, {args.steps} steps"


def run(args) -> dict:
  start = time.time()
  images, labels = load_mnist_test()
  train_rows, test_rows = np.arange(8000), np.arange(8000, 10000)
  if args.smoke:
    train_rows = np.arange(2000)
  t0 = time.time()
  classifier = train_classifier(images[train_rows], labels[train_rows], epochs=args.classifier_epochs)
  preds, real_features = classify(classifier, images[test_rows].astype(np.float32) / 255.0)
  classifier_accuracy = float((preds == labels[test_rows]).mean())
  print(f"classifier: held-out accuracy {classifier_accuracy:.4f} on {len(test_rows)} images "
        f"({time.time() - t0:.0f}s)", flush=True)

  fp_losses = {}
  if args.loss_seeds:
    # README reference facts (all 10,000 test images, one random t and noise each): DiT L1 0.0686, CNN MSE 0.0169
    t0 = time.time()
    for model_name, loader, key, reference in (("mnist_dit", load_dit, "l1", 0.0686), ("mnist_cnn", load_cnn, "mse", 0.0169)):
      if model_name not in args.models:
        continue
      model = loader()
      values = [noise_prediction_loss(model, images, labels, seed=s)[key] for s in range(args.loss_seeds)]
      fp_losses[model_name] = {"metric": key, "values_per_seed": values, "mean": float(np.mean(values)),
                               "reference": reference,
                               "relative_difference": float(np.mean(values) / reference - 1), "images": len(images)}
      print(f"{model_name}: FP noise-prediction {key} over {len(images)} images, seeds 0..{args.loss_seeds - 1}: "
            f"{[round(v, 5) for v in values]} (reference {reference})", flush=True)
    print(f"fp losses: {time.time() - t0:.0f}s", flush=True)

  fp_ddpm = None
  if args.ddpm_samples and "mnist_dit" in args.models and args.dit_sampler != "ddpm":
    # The checkpoint's own sampler (ancestral DDPM, 1000 steps) for the float DiT, as a reference point.
    t0 = time.time()
    model = load_dit()
    count = args.ddpm_samples
    y = jnp.arange(count, dtype=jnp.int32) % 10
    samples = ddpm_sample(model, schedule_for(model), jax.random.normal(jax.random.key(args.seed + 1), (count, 1, 28, 28)),
                          y, key=jax.random.key(args.seed + 2))
    pixels = np.asarray(schedule_for(model).to_unit(samples))[:, 0]
    preds, _ = classify(classifier, pixels)
    fp_ddpm = {"samples": count, "class_accuracy": float((preds == np.asarray(y)).mean()),
               "seconds": round(time.time() - t0, 1)}
    write_png(Path(args.out).parent / "diffusion_samples_mnist_dit_fp_ddpm1000.png", image_grid(pixels[:100], columns=10))
    print(f"mnist_dit fp DDPM-1000: class accuracy {fp_ddpm['class_accuracy']:.3f} ({fp_ddpm['seconds']}s)", flush=True)

  rows, reports = [], {}
  for model_name in args.models:
    kind = "dit" if model_name == "mnist_dit" else "cnn"
    loader = load_dit if kind == "dit" else load_cnn
    count = args.dit_samples if kind == "dit" else args.cnn_samples
    noise = jax.random.normal(jax.random.key(args.seed), (count, 1, 28, 28))
    class_labels = jnp.arange(count, dtype=jnp.int32) % 10 if kind == "dit" else None
    sampler = sampler_for(args, kind)
    fp_pixels = None
    runs = [(setting, None) for setting in args.settings if setting != "w4a4-quest"]
    if "w4a4-quest" in args.settings:  # the finetuning outcome varies with its seed: one row per seed
      runs += [("w4a4-quest", seed) for seed in args.quest_seeds]
    base_recipe = smoke_recipe(kind) if args.smoke else default_recipe(kind)
    calib, calibration_seconds = shared_calibration_set(loader, base_recipe, runs, args.progress)
    for setting, quest_seed in runs:
      t0 = time.time()
      model = loader()
      schedule = schedule_for(model)
      recipe = base_recipe
      if quest_seed is not None:
        recipe = dataclasses.replace(recipe, quest=dataclasses.replace(recipe.quest, seed=quest_seed))
      model, quant, report = quantize_for_setting(model, schedule, setting, recipe=recipe, calib=calib,
                                                  progress=args.progress)
      quant_seconds = time.time() - t0
      t1 = time.time()
      group_fn = quant.timestep_group if quant is not None else None
      if sampler == "ddpm":  # the checkpoint's own sampler: ancestral DDPM over all 1000 timesteps
        samples = ddpm_sample(model, schedule, noise, class_labels, key=jax.random.key(args.seed + 3),
                              group_fn=group_fn)
      else:
        samples = ddim_sample(model, schedule, noise, class_labels, steps=args.steps, group_fn=group_fn,
                              eta=args.eta, key=jax.random.key(args.seed + 3))
      pixels = np.asarray(schedule.to_unit(samples))[:, 0]  # [N,28,28]
      sample_seconds = time.time() - t1
      if setting == "fp":
        fp_pixels = pixels
      preds, features = classify(classifier, pixels)
      row = {
        "model": model_name, "setting": setting,
        "class_accuracy": None if kind == "cnn" else float((preds == np.asarray(class_labels)).mean()),
        "frechet": frechet_distance(features, real_features),
        "psnr": None if fp_pixels is None or setting == "fp" else psnr(pixels, fp_pixels),
        "samples": count, "sampler": sampler_name(args, kind), "integer_execution": setting != "fp",
        "quantize_seconds": round(quant_seconds, 1), "sample_seconds": round(sample_seconds, 1),
        "calibration_set_seconds": None if setting == "fp" else calibration_seconds,
      }
      if "quest" in report:
        q = report["quest"]
        row.update(quest_seed=quest_seed, quest_trained_values=q["num_trained_values"],
                   quest_trained_tensors=q["num_trained_tensors"], global_loss_before=q["global_loss_before"], global_loss_after=q["global_loss_after"])
        print(format_report(q), flush=True)
      rows.append(row)
      run_name = setting if quest_seed in (None, args.quest_seeds[0]) else f"{setting}-seed{quest_seed}"
      reports[f"{model_name}/{run_name}"] = {k: v for k, v in report.items() if k != "setting"}
      grid_pixels = pixels[:min(count, 100)]
      write_png(Path(args.out).parent / f"diffusion_samples_{model_name}_{run_name}.png", image_grid(grid_pixels, columns=10))
      print(f"{model_name:10s} {run_name:11s} acc={row['class_accuracy']} frechet={row['frechet']:.2f} "
            f"psnr={row['psnr']} ({quant_seconds:.0f}s quantize, {sample_seconds:.0f}s sample)", flush=True)

  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": f"{jax.default_backend()} ({platform.processor() or platform.machine()})",
    "jax_version": jax.__version__, "commit": git_commit(),
    "classifier": {"train_images": len(train_rows), "heldout_images": len(test_rows),
                   "heldout_accuracy": classifier_accuracy, "features": 128},
    "protocol": {"dit_sampler": sampler_name(args, "dit"), "cnn_sampler": sampler_name(args, "cnn"),
                 "noise": "the same initial and per-step noise in every setting", "seed": args.seed,
                 "dit_samples": args.dit_samples, "cnn_samples": args.cnn_samples,
                 "frechet_reference": "classifier features of the 2000 held-out MNIST test images"},
    "fp_losses": fp_losses, "fp_dit_ddpm1000": fp_ddpm,
    "rows": rows, "reports": reports, "seconds": round(time.time() - start, 1),
  }


def quest_seed_summary(rows: list[dict]) -> list[str]:
  """Markdown lines: per model with several w4a4-quest rows, their mean class accuracy / Frechet against FP."""
  lines = []
  for model in sorted({r["model"] for r in rows}):
    quest = [r for r in rows if r["model"] == model and r["setting"] == "w4a4-quest"]
    fp = next((r for r in rows if r["model"] == model and r["setting"] == "fp"), None)
    if len(quest) < 2:
      continue
    frechet = np.mean([r["frechet"] for r in quest])
    line = f"{model} w4a4-quest over {len(quest)} finetuning seeds: mean Frechet {frechet:.2f}"
    if quest[0]["class_accuracy"] is not None:
      accuracies = [r["class_accuracy"] for r in quest]
      line += f", class accuracy mean {np.mean(accuracies):.3f} (min {min(accuracies):.3f}, max {max(accuracies):.3f})"
      if fp is not None and fp["class_accuracy"]:
        line += f", {100 * np.mean(accuracies) / fp['class_accuracy']:.1f}% of FP"
    lines += ["", line + "."]
  return lines


def markdown(result: dict) -> str:
  def fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

  lines = [
    "# Diffusion quality (MNIST)", "",
    f"{result['date']}, {result['device']}, jax {result['jax_version']}, commit {result['commit'][:10]}. "
    f"Samplers: DiT {result['protocol']['dit_sampler']}, CNN {result['protocol']['cnn_sampler']} "
    f"({result['protocol']['noise']}); {result['protocol']['dit_samples']} DiT samples "
    f"(equal per class), {result['protocol']['cnn_samples']} CNN samples. Classifier held-out accuracy "
    f"{result['classifier']['heldout_accuracy']:.4f} ({result['classifier']['heldout_images']} images).", "",
    "| model | setting | QuEST seed | class accuracy | Frechet (classifier features) | PSNR vs FP (dB) | "
    "QuEST trained values |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    lines.append(f"| {r['model']} | {r['setting']} | {fmt(r.get('quest_seed'))} | {fmt(r['class_accuracy'])} | "
                 f"{fmt(r['frechet'], 2)} | {fmt(r['psnr'], 2)} | {fmt(r.get('quest_trained_values'))} |")
  lines += quest_seed_summary(result["rows"])
  if result.get("fp_dit_ddpm1000"):
    d = result["fp_dit_ddpm1000"]
    lines += ["", f"Float DiT with its own sampler (ancestral DDPM, 1000 steps, {d['samples']} samples): "
                  f"class accuracy {d['class_accuracy']:.3f}."]
  for name, f in result.get("fp_losses", {}).items():
    lines += ["", f"{name} float noise-prediction {f['metric'].upper()} on all {f['images']} test images: "
                  f"{', '.join(f'{v:.5f}' for v in f['values_per_seed'])} (seeds 0..{len(f['values_per_seed']) - 1}; "
                  f"mean {f['mean']:.5f}, reference {f['reference']}, {100 * f['relative_difference']:+.1f}%)."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["mnist_dit", "mnist_cnn"], choices=["mnist_dit", "mnist_cnn"])
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  parser.add_argument("--dit-sampler", choices=["ddpm", "ddim"], default="ddpm",
                      help="ddpm: the checkpoint's own ancestral sampler over all 1000 steps (default); ddim: --steps")
  parser.add_argument("--cnn-sampler", choices=["ddpm", "ddim"], default="ddim",
                      help="default ddim (--steps 25): the 1000-step sampler of the conv net is slow on a CPU")
  parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
  parser.add_argument("--eta", type=float, default=1.0,
                      help="DDIM eta: 1.0 ancestral (default; the float DiT classifies better with it), 0.0 deterministic")
  parser.add_argument("--merge", nargs="+", default=None, help="merge earlier JSON results (per model) into --out")
  parser.add_argument("--dit-samples", type=int, default=200)
  parser.add_argument("--cnn-samples", type=int, default=64)
  parser.add_argument("--classifier-epochs", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quest-seeds", type=int, nargs="+", default=[0],
                      help="finetuning seeds of w4a4-quest (QuestConfig.seed): one row each")
  parser.add_argument("--loss-seeds", type=int, default=2, help="seeds of the full-test-set FP loss check (0: skip)")
  parser.add_argument("--ddpm-samples", type=int, default=100,
                      help="FP DiT samples with the 1000-step DDPM sampler (0: skip)")
  parser.add_argument("--progress", action="store_true", help="tqdm bars for calibration")
  parser.add_argument("--smoke", action="store_true",
                      help="CI check of the whole script in seconds: tiny recipes and classifier, no numbers to keep")
  parser.add_argument("--out", default=str(RESULTS / "diffusion_quality"), help="path stem for .json/.md")
  args = parser.parse_args(argv)
  if args.merge:
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    result = dict(parts[0])
    for key in ("rows",):
      result[key] = [row for part in parts for row in part[key]]
    for key in ("reports", "fp_losses"):
      result[key] = {k: v for part in parts for k, v in (part.get(key) or {}).items()}
    result["fp_dit_ddpm1000"] = next((p["fp_dit_ddpm1000"] for p in parts if p.get("fp_dit_ddpm1000")), None)
    # "<kind>_samples" comes from the part that sampled that model (a part's default for the others is moot)
    result["protocol"] = {**parts[0]["protocol"], **{
      k: v for p in parts for k, v in p["protocol"].items()
      if k.endswith("_samples") and f"mnist_{k[:-len('_samples')]}" in {r["model"] for r in p["rows"]}}}
    result["seconds"] = sum(p["seconds"] for p in parts)
    result["runs"] = [{"commit": p["commit"], "date": p["date"], "seconds": p["seconds"],
                       "models": sorted({r["model"] for r in p["rows"]})} for p in parts]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return
  if "fp" not in args.settings:
    args.settings = ["fp"] + args.settings  # PSNR needs the float samples
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  result = run(args)
  out = Path(args.out)
  out.with_suffix(".json").write_text(json.dumps(result, indent=2))
  table = markdown(result)
  out.with_suffix(".md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
