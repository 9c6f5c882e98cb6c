"""QuEST pipeline smoke tests on tiny settings (calibration, AdaRound, finetuning, integer execution, CLI)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calib.adaround import AdaRoundConfig, CalibrationConfig, PTQConfig, run_ptq
from calib.quest import (CNN_QUEST, DIT_QUEST, format_report, gain_penalty, quantize_for_setting, quest_finetune,
                         selected_layers)
from cometjax.core.formats import StaticActQuantWeight
from cometjax.diffusion.attach import attach_quantizers, named_modules, to_integer
from cometjax.diffusion.config import preset
from cometjax.diffusion.sampling import schedule_for
from cometjax.models.layers import QuantLinear
from tests.conftest import require_data

TINY_CALIBRATION = CalibrationConfig(num_trajectories=8, steps=4, num_samples=32, record_samples=16)
TINY_ADAROUND = AdaRoundConfig(iterations=4, batch_samples=4)


@pytest.fixture(scope="module")
def dit_ptq():
  require_data("diffusion", "mnist_dit", "model.safetensors")
  from cometjax.checkpoint.diffusion import load_dit
  model = load_dit()
  schedule = schedule_for(model)
  quant = preset("w4a4")
  # AdaRound compiles one step per layer shape; the fixture skips it (tested on one layer below).
  model, calib, report = run_ptq(model, schedule, PTQConfig(quant, TINY_CALIBRATION, None), progress=False)
  return model, schedule, quant, calib, report


@pytest.mark.realdata
def test_ptq_report_and_edge_layers(dit_ptq):
  model, _, _, calib, report = dit_ptq
  assert len(calib) == 32 and calib.labels is not None
  assert report["adaround_layers"] == 0 and report["activation_quantizers"] == 41 + 3 * 2 * 2
  layers = dict(named_modules(model, QuantLinear))
  # first (patch conv + embedding) and last layer: 8-bit weights and inputs; the rest W4A4
  for name in ("patch_conv", "patch_emb", "final"):
    assert layers[name].quant.weight.bits == 8 and layers[name].quant.act.bits == 8
  assert layers["blocks.0.wq"].quant.weight.bits == 4 and layers["blocks.0.wq"].quant.act.bits == 4
  assert model.blocks[0].pv.quant.lhs.bits == 8  # softmax output


@pytest.mark.realdata
def test_adaround_one_layer(dit_ptq):
  from calib.adaround import adaround_layer, record_layer_inputs
  from cometjax.checkpoint.diffusion import load_dit
  _, schedule, quant, calib, _ = dit_ptq
  small = calib.take(np.arange(8))
  records = record_layer_inputs(load_dit(), schedule, small)
  model = load_dit()
  from calib.adaround import calibrate_activations
  from cometjax.diffusion.attach import attach_quantizers
  attach_quantizers(model, quant)
  groups = np.asarray(quant.timestep_group(small.index))
  calibrate_activations(model, records, groups, quant.num_timestep_groups)
  layer = model.blocks[0].ff1
  x = jnp.asarray(records["blocks.0.ff1"])
  target = x @ layer.kernel[...] + layer.bias[...]
  nearest = float(((layer(x, jnp.asarray(groups)) - target) ** 2).mean())
  float_ratio = np.asarray(layer.kernel[...] / layer.quant.weight.scale[...])
  error = adaround_layer(layer, records["blocks.0.ff1"], groups, AdaRoundConfig(iterations=60, batch_samples=8))
  adarounded = float(((layer(x, jnp.asarray(groups)) - target) ** 2).mean())
  assert error > 0 and adarounded < nearest * 1.05
  # the hard rounding is folded into the kernel on the grid (kernel = s q): nearest rounding gives AdaRound's
  # codes, each floor(W / s) or floor(W / s) + 1, within a step of the float weight where it is not clipped
  assert layer.quant.weight.rounding == "nearest"
  ratio = np.asarray(layer.kernel[...] / layer.quant.weight.scale[...])
  codes = np.asarray(layer.quant.weight.integer_values(layer.kernel[...]))
  inside = np.abs(float_ratio) < 7  # unclipped
  assert np.all(np.isin(codes[inside] - np.floor(float_ratio[inside]), (0.0, 1.0)))
  np.testing.assert_allclose(ratio, codes, atol=1e-4)
  assert np.abs(ratio - float_ratio)[inside].max() <= 1 + 1e-4
  assert 0.05 < float(np.mean(codes != np.floor(float_ratio + 0.5))) < 0.5  # some roundings changed, not all


@pytest.mark.slow
@pytest.mark.realdata
def test_quest_finetune_trains_the_selected_subset_and_lowers_the_loss(dit_ptq):
  model, schedule, quant, calib, _ = dit_ptq
  model = nnx.clone(model)
  chosen = selected_layers(model, DIT_QUEST)
  assert chosen["time_mlp1"] == "TLA" and chosen["blocks.2.alpha2"] == "TLA"
  assert chosen["blocks.1.wq"] == "CMA" and chosen["blocks.0.ff2"] == "CMA"
  assert "patch_emb" not in chosen and "final" not in chosen
  config = dataclasses.replace(DIT_QUEST, steps=12, batch_size=16, weight_learning_rate=1e-3)
  before_kernel = np.asarray(model.patch_emb.kernel[...])
  report = quest_finetune(model, schedule, quant, calib, config, progress=False)
  assert report["num_tla_layers"] == 2 + 3 * 6 and report["num_cma_layers"] == 3 * 6
  assert "blocks.0.wq.kernel" in report["trained_parameters"]
  assert "patch_emb.quant.act.step" in report["trained_parameters"]  # all activation scales
  assert "patch_emb.kernel" not in report["trained_parameters"]
  assert report["global_loss_after"] < report["global_loss_before"]
  np.testing.assert_array_equal(np.asarray(model.patch_emb.kernel[...]), before_kernel)
  assert "TLA" in format_report(report)


@pytest.mark.slow
@pytest.mark.realdata
def test_quest_iterate_averaging(dit_ptq):
  model, schedule, quant, calib, _ = dit_ptq
  config = dataclasses.replace(DIT_QUEST, steps=4, batch_size=8, weight_learning_rate=1e-2)

  def finetuned_kernel(average_fraction):
    tuned = nnx.clone(model)
    quest_finetune(tuned, schedule, quant, calib, dataclasses.replace(config, average_fraction=average_fraction),
                   progress=False)
    return np.asarray(tuned.blocks[0].wq.kernel[...])

  last = finetuned_kernel(0.0)
  np.testing.assert_array_equal(finetuned_kernel(0.25), last)  # the mean of the last iterate alone
  mean_of_two = finetuned_kernel(0.5)
  assert np.isfinite(mean_of_two).all() and not np.array_equal(mean_of_two, last)
  # the mean of iterates 3 and 4 is nearer iterate 4 than iterate 2 is (the mean of the last 3)
  assert np.abs(mean_of_two - last).max() < np.abs(finetuned_kernel(0.75) - last).max()
  with pytest.raises(ValueError, match="average_fraction must be in"):
    dataclasses.replace(DIT_QUEST, average_fraction=1.5)


@pytest.mark.slow
@pytest.mark.realdata
def test_default_recipe_finetuning_lowers_its_objective_and_not_held_out_error(dit_ptq):
  from calib.adaround import build_calibration_set, with_other_labels
  from calib.quest import calibration_losses, default_recipe
  from cometjax.checkpoint.diffusion import load_dit
  model, schedule, quant, tiny_calib, _ = dit_ptq
  recipe = default_recipe("dit")
  # the recipe's quantizers and objective on a small calibration budget: a few paths of the DDPM sampler
  calibration = dataclasses.replace(recipe.calibration, num_trajectories=8, steps=20, num_samples=128,
                                    record_samples=32)
  recipe = dataclasses.replace(recipe, calibration=calibration,
                               quest=dataclasses.replace(recipe.quest, steps=40, batch_size=16))
  with pytest.raises(ValueError, match="other_labels"):
    quest_finetune(nnx.clone(model), schedule, quant, tiny_calib, recipe.quest, progress=False)
  float_model = load_dit()
  calib = with_other_labels(float_model, schedule, build_calibration_set(float_model, schedule, calibration,
                                                                         progress=False))
  assert np.all(calib.other_labels != calib.labels)
  assert np.all((calib.other_labels >= 0) & (calib.other_labels <= 9))
  # the float eps for another class differs, but only slightly (the class signal is small)
  difference = np.abs(calib.other_eps - calib.eps).mean()
  assert 0 < difference < 0.5 * np.abs(calib.eps).mean()
  assert calib.take(np.arange(4)).other_eps.shape == (4, 1, 28, 28)
  # held out: states of other float paths (another seed), never seen by the finetuning
  held_out = build_calibration_set(float_model, schedule, dataclasses.replace(calibration, seed=1), progress=False)

  def quantized(steps):
    steps_recipe = dataclasses.replace(recipe, quest=dataclasses.replace(recipe.quest, steps=steps))
    return quantize_for_setting(load_dit(), schedule, "w4a4-quest", recipe=steps_recipe, calib=calib,
                                progress=False, integer=False)

  start, start_quant, _ = quantized(0)
  tuned, tuned_quant, report = quantized(recipe.quest.steps)
  report = report["quest"]
  assert report["objective_after"] < report["objective_before"]
  assert report["objective_before"] > report["global_loss_before"]  # the gain terms are in the objective
  held_out_before = calibration_losses(start, schedule, start_quant, held_out)[0]
  assert calibration_losses(tuned, schedule, tuned_quant, held_out)[0] <= held_out_before
  with pytest.raises(ValueError, match="eps_gain_weight must be >= 0"):
    dataclasses.replace(DIT_QUEST, eps_gain_weight=-1.0)


@pytest.mark.realdata
def test_act_bits_overrides_pick_the_input_bits_of_matching_layers():
  require_data("diffusion", "mnist_dit", "model.safetensors")
  from cometjax.checkpoint.diffusion import load_dit
  from cometjax.diffusion.attach import attach_quantizers
  quant = dataclasses.replace(preset("w4a4"), act_bits_overrides=((r"gamma|beta|alpha|time_mlp", 8),))
  layers = dict(named_modules(attach_quantizers(load_dit(), quant), QuantLinear))
  assert layers["blocks.1.gamma2"].quant.act.bits == 8 and layers["time_mlp1"].quant.act.bits == 8
  assert layers["blocks.1.gamma2"].quant.weight.bits == 4
  assert layers["blocks.1.wq"].quant.act.bits == 4


@nnx.jit
def _forward(model, x, t, y, group):
  return model(x, t, y, group)


@pytest.mark.slow
@pytest.mark.realdata
def test_integer_execution_matches_fake_quantization(dit_ptq):
  model, schedule, quant, calib, _ = dit_ptq
  x, t, y = jnp.asarray(calib.x[:8]), jnp.asarray(calib.index[:8]), jnp.asarray(calib.labels[:8])
  group = quant.timestep_group(t)
  fake = _forward(model, x, t, y, group)
  integer = to_integer(nnx.clone(model))
  assert isinstance(integer.blocks[0].wq.quant.integer_leaf(0), StaticActQuantWeight)
  assert integer.blocks[0].wq.quant.integer_data[...].dtype == jnp.uint8  # packed INT4
  for g in range(quant.num_timestep_groups):  # scalar group, as the sampler passes it
    rows = np.asarray(group) == g
    if rows.any():
      got = _forward(integer, x[rows], t[rows], y[rows], jnp.int32(g))
      want = _forward(model, x[rows], t[rows], y[rows], jnp.int32(g))
      rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
      assert rel < 2e-3, (g, rel)  # float vs int32 accumulation may flip a rare rounding tie
  assert fake.shape == (8, 1, 28, 28)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("kind,rotation", [("dit", None), ("cnn", None), ("dit", "hadamard"), ("cnn", "hadamard")])
def test_per_token_grouped_integer_execution_matches_fake_quantization(kind, rotation):
  """act_granularity="token": the layers run the W4Ax GEMM path (formats.QuantizedWeight leaves; with the
  online rotation, inside an InputTransformWeight).  The rotated runs also AdaRound a few steps, whose
  float target goes through the rotated kernel (QuantConv: im2col).

  Every quantized layer, given one input, agrees with its fake-quantized self to float rounding, up to a
  rare token whose code flipped on a tie.  The whole network cannot be held to that: float32 and int32
  accumulation differ in the last bits, and a per-token 4-bit quantizer downstream turns a value a few ulps
  from a rounding boundary into a whole step (the CI host and this one flip different codes).  So the
  network's integer output must sit far closer to its fake output than the fake output sits to the float model.
  Attention matmuls stay in float here (static quantizers there put p@v on a lattice of exact ties).
  """
  from cometjax.core import formats
  from cometjax.core.formats import InputTransformWeight
  require_data("diffusion", f"mnist_{kind}", "model.safetensors")
  from cometjax.checkpoint.diffusion import load_cnn, load_dit
  load = load_dit if kind == "dit" else load_cnn
  model = load()
  schedule = schedule_for(model)
  quant = dataclasses.replace(preset("w4a4"), act_granularity="token", weight_group_size=16,
                              quantize_attention_matmuls=False, rotation=rotation)
  calibration = CalibrationConfig(num_trajectories=4, steps=3, num_samples=8, record_samples=4)
  adaround = AdaRoundConfig(iterations=3, batch_samples=4) if rotation else None
  model, calib, report = run_ptq(model, schedule, PTQConfig(quant, calibration, adaround), progress=False)
  if rotation:
    assert max(report["adaround_relative_error"].values()) < 0.5
  assert report["activation_quantizers"] == 0  # nothing static to calibrate
  x, index = jnp.asarray(calib.x[:4]), jnp.asarray(calib.index[:4])
  if kind == "dit":
    forward = nnx.jit(lambda m, x, t: m(x, t, jnp.arange(4) % 10, 0))
  else:
    forward = nnx.jit(lambda m, x, t: m(x, t / 1000, 0))
  want = forward(model, x, index)
  float_out = forward(load(), x, index)
  layer_inputs = _random_layer_inputs(model)
  layer_want = _layer_outputs(model, layer_inputs)
  to_integer(model)
  layers = dict(named_modules(model, QuantLinear))
  name = "blocks.0.wq" if kind == "dit" else "blocks.1.conv.linear"
  leaf = layers[name].quant.integer_leaf(0)
  if rotation:
    assert isinstance(leaf, InputTransformWeight) and leaf.region is not None
    leaf = leaf.inner
  assert isinstance(leaf, formats.QuantizedWeight) and leaf.group_size == 16 and leaf.activation.int8_channels == 0
  layer_got = _layer_outputs(model, layer_inputs)
  for name in layer_want:  # a flipped code moves one token's row; a wrong format moves every row
    rows = jnp.linalg.norm(layer_got[name] - layer_want[name], axis=-1) / jnp.linalg.norm(layer_want[name], axis=-1)
    assert float(jnp.mean(rows > 1e-4)) <= 0.02, (name, float(jnp.max(rows)))
  got = forward(model, x, index)
  quantization_error = _relative(want, float_out)
  assert quantization_error > 0.1  # the 4-bit model is far from the float one, so the bound below means something
  assert _relative(got, want) < 0.2 * quantization_error, (_relative(got, want), quantization_error)


def _random_layer_inputs(model) -> dict:
  """name -> f32 [256 tokens, K] for every quantized linear layer: Gaussian, every 13th channel 9x larger."""
  inputs = {}
  for i, (name, layer) in enumerate(named_modules(model, QuantLinear)):
    if layer.quant is not None:
      k = layer.kernel.shape[0]
      scale = 1.0 + 8.0 * (jnp.arange(k) % 13 == 0)
      inputs[name] = jax.random.normal(jax.random.key(i), (256, k)) * scale
  return inputs


@nnx.jit
def _layer_outputs(model, inputs: dict) -> dict:
  layers = dict(named_modules(model, QuantLinear))
  return {name: layers[name](x, 0) for name, x in inputs.items()}


def _relative(got, want) -> float:
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


@pytest.mark.slow
@pytest.mark.realdata
def test_cnn_quest_smoke():
  require_data("diffusion", "mnist_cnn", "model.safetensors")
  from cometjax.checkpoint.diffusion import load_cnn
  model = load_cnn()
  schedule = schedule_for(model)
  quant = preset("w4a4")
  calibration = CalibrationConfig(num_trajectories=4, steps=3, num_samples=8, record_samples=4)
  model, calib, _ = run_ptq(model, schedule, PTQConfig(quant, calibration, None), progress=False)
  report = quest_finetune(model, schedule, quant, calib, dataclasses.replace(CNN_QUEST, steps=2, batch_size=2),
                          progress=False)
  assert report["num_tla_layers"] == 4 and report["num_cma_layers"] == 4
  x, t = jnp.asarray(calib.x[:2]), jnp.asarray(calib.index[:2]) / 1000
  want = nnx.jit(lambda m, x, t: m(x, t, 1))(model, x, t)
  to_integer(model)
  assert model.blocks[1].conv.linear.quant.execution == "integer"  # im2col + integer GEMM
  got = nnx.jit(lambda m, x, t: m(x, t, 1))(model, x, t)
  assert got.shape == (2, 1, 28, 28)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 2e-3


def test_gain_penalty_sees_shrinkage_not_orthogonal_noise():
  rng = np.random.default_rng(0)
  ref = jnp.asarray(rng.standard_normal((4, 1, 28, 28)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((4, 1, 28, 28)), jnp.float32)
  noise = noise - ref * ((noise * ref).sum((1, 2, 3), keepdims=True) / (ref * ref).sum((1, 2, 3), keepdims=True))
  assert float(gain_penalty(ref + 3.0 * noise, ref)) < 1e-10  # MSE 9, gain still 1
  np.testing.assert_allclose(float(gain_penalty(0.5 * ref, ref)), 0.25, rtol=1e-5)  # MSE 0.25, gain 1/2
  half = jnp.concatenate([ref[:2], 0.0 * ref[2:]])  # per sample: gains 1, 1, 0, 0
  np.testing.assert_allclose(float(gain_penalty(half, ref)), 0.5, rtol=1e-5)
  with pytest.raises(ValueError, match="class_gain_weight must be >= 0"):
    dataclasses.replace(DIT_QUEST, class_gain_weight=-1.0)
  assert dataclasses.replace(DIT_QUEST, class_gain_weight=1.0).needs_other_labels
  assert not dataclasses.replace(DIT_QUEST, eps_gain_weight=1.0).needs_other_labels


def test_plan_states_the_work_and_its_expected_time():
  from calib.quest import default_recipe, describe_plan, estimated_seconds
  recipe = default_recipe("dit")
  longer = dataclasses.replace(recipe, quest=dataclasses.replace(recipe.quest, steps=2 * recipe.quest.steps))
  assert estimated_seconds("dit", "fp") == 0
  quest_seconds = estimated_seconds("dit", "w4a4-quest", recipe)
  assert estimated_seconds("dit", "w4a4-quest", longer) > quest_seconds > estimated_seconds("dit", "w8a8", recipe) > 0
  plan = describe_plan("dit", "w4a4-quest", recipe)
  assert f"{recipe.quest.steps} finetuning steps" in plan and f"About {quest_seconds / 60:.1f} min" in plan
  with pytest.raises(ValueError, match="setting must be one of"):
    estimated_seconds("dit", "w3a3")


def test_setting_errors():
  with pytest.raises(ValueError, match="setting must be one of"):
    quantize_for_setting(None, None, "w3a3")
  with pytest.raises(ValueError, match="preset"):
    preset("w2a2")


@pytest.mark.realdata
def test_cli_sample_fp_and_saved_quantized(tmp_path):
  require_data("diffusion", "mnist_dit", "model.safetensors")
  import argparse

  from cometjax.cli.sample import add_command as add_sample_command
  parser = argparse.ArgumentParser()
  add_sample_command(parser.add_subparsers())
  out = tmp_path / "s.png"
  args = parser.parse_args(["sample", "--model", "dit", "--classes", "3,7", "--count", "4", "--steps", "3",
                            "--out", str(out), "--quiet"])
  args.func(args)
  assert out.read_bytes()[:4] == b"\x89PNG"
  from cometjax.errors import UsageError
  with pytest.raises(UsageError, match="--classes: must be digits"):
    bad = parser.parse_args(["sample", "--classes", "12", "--count", "2", "--steps", "2", "--out", str(out), "--quiet"])
    bad.func(bad)


@pytest.mark.slow
@pytest.mark.realdata
def test_saved_rotated_token_model_reloads_with_the_same_output(tmp_path):
  """The kernels of a rotated model are R^T W: the saved state must rebuild the same integer model."""
  require_data("diffusion", "mnist_dit", "model.safetensors")
  from cometjax.checkpoint.diffusion import (load_dit, load_quantized_diffusion as load_quantized,
                                             save_quantized_diffusion as save_quantized)
  model = load_dit()
  schedule = schedule_for(model)
  quant = dataclasses.replace(preset("w4a4"), act_granularity="token", rotation="hadamard")
  calibration = CalibrationConfig(num_trajectories=4, steps=3, num_samples=8, record_samples=4)
  model, calib, _ = run_ptq(model, schedule, PTQConfig(quant, calibration, None), progress=False)
  with pytest.raises(ValueError, match="attach quantizers to a freshly loaded model"):
    attach_quantizers(model, quant)  # its kernels are already R^T W
  to_integer(model)
  forward = nnx.jit(lambda m, x, t: m(x, t, jnp.arange(4) % 10, quant.timestep_group(t)))
  x, index = jnp.asarray(calib.x[:4]), jnp.asarray(calib.index[:4])
  want = forward(model, x, index)
  save_quantized(model, quant, "dit", "w4a4-ptq", tmp_path / "q")
  loaded, kind, loaded_quant = load_quantized(tmp_path / "q", "dit")
  assert kind == "dit" and loaded_quant == quant
  np.testing.assert_array_equal(np.asarray(forward(loaded, x, index)), np.asarray(want))


@pytest.mark.slow
@pytest.mark.realdata
def test_diffusion_quality_bench_smoke(tmp_path):
  require_data("diffusion", "mnist_dit", "model.safetensors")
  require_data("mnist", "t10k-images-idx3-ubyte.gz")
  from tests.conftest import load_bench_script
  bench = load_bench_script("diffusion_quality")
  out = tmp_path / "quality"
  bench.main(["--smoke", "--models", "mnist_dit", "--settings", "w4a4-quest", "--dit-samples", "10",
              "--dit-sampler", "ddim", "--steps", "3", "--classifier-epochs", "1", "--loss-seeds", "0",
              "--quest-seeds", "0", "3", "--out", str(out)])
  import json
  result = json.loads(out.with_suffix(".json").read_text())
  rows = {(row["setting"], row.get("quest_seed")): row for row in result["rows"]}
  assert set(rows) == {("fp", None), ("w4a4-quest", 0), ("w4a4-quest", 3)}  # fp is added: PSNR needs it
  quest = rows["w4a4-quest", 3]
  assert 0 <= quest["class_accuracy"] <= 1 and quest["psnr"] is not None
  assert quest["quest_trained_values"] > 0 and "DDIM" in rows["fp", None]["sampler"]
  assert set(result["reports"]) == {"mnist_dit/fp", "mnist_dit/w4a4-quest", "mnist_dit/w4a4-quest-seed3"}
  assert (tmp_path / "diffusion_samples_mnist_dit_w4a4-quest-seed3.png").exists()
  table = out.with_suffix(".md").read_text()
  assert "| mnist_dit | w4a4-quest | 3 |" in table and "w4a4-quest over 2 finetuning seeds" in table


@pytest.mark.parametrize("kind", ["dit", "cnn"])
@pytest.mark.parametrize("from_adaround", [False, True])
def test_recipe_ptq_adaround_per_setting(kind, from_adaround):
  from calib.quest import default_recipe
  recipe = dataclasses.replace(default_recipe(kind), quest_from_adaround=from_adaround)
  assert recipe.ptq_adaround("w8a8") is None
  assert recipe.ptq_adaround("w4a4-ptq") == recipe.adaround and recipe.ptq_adaround("w4a8") == recipe.adaround
  # w4a4-quest finetunes either the AdaRound PTQ model or round-to-nearest weights
  assert recipe.ptq_adaround("w4a4-quest") == (recipe.adaround if from_adaround else None)
