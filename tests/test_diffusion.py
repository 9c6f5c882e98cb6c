"""Diffusion models, samplers and the integer layers of QuEST (fast; realdata tests skip without data)."""

import math
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cometjax import ops
from cometjax.core import formats
from cometjax.core.formats import (InputTransformWeight, StaticActQuantWeight,
                                   pack_static_weight as make_static_act_weight)
from cometjax.core.numerics import quantize_static as quantize_activation_int, unpack_int4
from cometjax.core.rotations import rotate_rows as rotate_kernel
from cometjax.diffusion.config import DiffusionQuantConfig
from cometjax.diffusion.evaluation import load_mnist_test, noise_prediction_loss
from cometjax.diffusion.images import image_grid, write_png
from cometjax.diffusion.quantizers import (LinearQuantizer, MatmulQuantizer, TokenActQuantizer, WeightQuantizer,
                                           best_weight_scale, fake_static_codes, integer_act_matmul, rotation_blocks)
from cometjax.diffusion.sampling import cnn_schedule, ddim_sample, ddpm_sample, ddpm_trajectory, dit_schedule
from cometjax.models.layers import QuantLinear
from cometjax.pallas.quantize_act import quantize_act_reference
from tests.conftest import require_data

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------------------------
# Torch references written from the data README / config.json


class TorchDiT(torch.nn.Module):
  def __init__(self, sd):
    super().__init__()
    self.sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}

  def lin(self, x, name):
    return torch.nn.functional.linear(x, self.sd[name + ".weight"], self.sd[name + ".bias"])

  def ln(self, x, name):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.sd[name + ".weight"], self.sd[name + ".bias"], 1e-5)

  def forward(self, x, t, y):
    sd = self.sd
    half = sd["time_emb.0.half_emb"]
    ang = t[:, None].float() * half[None]
    temb = torch.cat([ang.sin(), ang.cos()], -1)
    temb = self.lin(torch.relu(self.lin(temb, "time_emb.1")), "time_emb.3")
    cond = sd["label_emb.weight"][y] + temb
    h = torch.nn.functional.conv2d(x, sd["conv.weight"], sd["conv.bias"], stride=4)
    b = h.shape[0]
    h = h.permute(0, 2, 3, 1).reshape(b, 49, 16)
    h = self.lin(h, "patch_emb") + sd["patch_pos_emb"]
    for i in range(3):
      p = f"dits.{i}"
      g1, b1, a1, g2, b2, a2 = (self.lin(cond, f"{p}.{n}") for n in ("gamma1", "beta1", "alpha1", "gamma2", "beta2", "alpha2"))
      z = self.ln(h, f"{p}.ln1") * (1 + g1[:, None]) + b1[:, None]
      q = self.lin(z, f"{p}.wq").view(b, 49, 4, 64).permute(0, 2, 1, 3)
      k = self.lin(z, f"{p}.wk").view(b, 49, 4, 64).permute(0, 2, 3, 1)
      v = self.lin(z, f"{p}.wv").view(b, 49, 4, 64).permute(0, 2, 1, 3)
      att = torch.softmax(q @ k / math.sqrt(49), -1)
      o = (att @ v).permute(0, 2, 1, 3).reshape(b, 49, 256)
      h = h + self.lin(o, f"{p}.lv") * a1[:, None]
      z = self.ln(h, f"{p}.ln2") * (1 + g2[:, None]) + b2[:, None]
      h = h + self.lin(torch.relu(self.lin(z, f"{p}.ff.0")), f"{p}.ff.2") * a2[:, None]
    out = self.lin(self.ln(h, "ln"), "linear")
    out = out.view(b, 7, 7, 1, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, 28, 28)
    return out


def torch_cnn(sd, x, t):
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
  ang = t[:, None] * sd["gt.frequencies"][None]
  temb = torch.cat([ang.sin(), ang.cos() - 1], -1)
  for i in (0, 2, 4, 6):
    temb = torch.nn.functional.linear(temb, sd[f"gt.time_embed.{i}.weight"], sd[f"gt.time_embed.{i}.bias"])
    if i < 6:
      temb = torch.nn.functional.gelu(temb)
  h = x
  for i in range(4):
    p = f"gt.blocks.{i}.net"
    h = torch.nn.functional.conv2d(h, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], padding=3)
    h = torch.nn.functional.layer_norm(h, h.shape[1:], sd[f"{p}.1.weight"], sd[f"{p}.1.bias"], 1e-5)
    h = torch.nn.functional.gelu(h)
    if i == 0:
      h = h + temb[:, :, None, None]
  return torch.nn.functional.conv2d(h, sd["gt.blocks.4.weight"], sd["gt.blocks.4.bias"], padding=1)


def _tensors(folder):
  from safetensors.numpy import load_file
  return load_file(str(folder / "model.safetensors"))


@pytest.mark.realdata
def test_dit_matches_torch_reference():
  folder = require_data("diffusion", "mnist_dit")
  from cometjax.checkpoint.diffusion import load_dit
  model = load_dit(folder)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
  t = np.array([0, 1, 250, 500, 998, 999])
  y = np.array([0, 3, 5, 7, 9, 2])
  ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
  with torch.no_grad():
    ref = TorchDiT(_tensors(folder))(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
  assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


@pytest.mark.realdata
def test_cnn_matches_torch_reference():
  folder = require_data("diffusion", "mnist_cnn")
  from cometjax.checkpoint.diffusion import load_cnn
  model = load_cnn(folder)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
  t = np.array([0.001, 0.5, 1.0], np.float32)
  ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t)))
  with torch.no_grad():
    ref = torch_cnn(_tensors(folder), torch.from_numpy(x), torch.from_numpy(t)).numpy()
  assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4


@pytest.mark.slow
@pytest.mark.realdata
def test_noise_prediction_losses_match_reference_facts():
  """README facts (DiT L1 0.0686, CNN MSE 0.0169) within 3%, on the first 2000 test images (seed 0).

  The full 10,000 images are evaluated by bench/diffusion_quality.py (fp_losses in its JSON).
  """
  require_data("mnist", "t10k-images-idx3-ubyte.gz")
  from cometjax.checkpoint.diffusion import load_cnn, load_dit
  images, labels = load_mnist_test()
  images, labels = images[:2000], labels[:2000]
  dit_model = load_dit()
  dit = noise_prediction_loss(dit_model, images, labels, seed=0)
  cnn = noise_prediction_loss(load_cnn(), images, None, seed=0)
  assert abs(dit["l1"] - 0.0686) / 0.0686 < 0.03, dit
  assert abs(cnn["mse"] - 0.0169) / 0.0169 < 0.03, cnn
  # conditioning matters: wrong labels (shifted by 5) predict worse (README: 0.0743 vs 0.0686)
  shifted = noise_prediction_loss(dit_model, images, labels, seed=0, label_shift=5)
  assert shifted["l1"] > dit["l1"] * 1.04


def test_mnist_loader_facts():
  require_data("mnist", "t10k-images-idx3-ubyte.gz")
  images, labels = load_mnist_test()
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
  assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----------------------------------------------------------------------------------------------
# Schedules and samplers


def test_schedules():
  dit = dit_schedule()
  assert len(dit.betas) == 1000 and dit.betas[0] == pytest.approx(1e-4) and dit.betas[-1] == pytest.approx(0.02)
  cnn = cnn_schedule()
  assert len(cnn.alpha_bars) == 1001 and cnn.first_index == 1 and cnn.last_index == 1000
  assert float(cnn.model_time(jnp.array(500))) == pytest.approx(0.5)
  assert dit.ddim_indices(5).tolist() == [999, 749, 500, 250, 0]
  with pytest.raises(ValueError, match="steps"):
    dit.ddim_indices(0)


class OracleDenoiser(nnx.Module):
  """The exact eps for data concentrated at one image x0: eps = (x - sqrt(ab) x0) / sqrt(1 - ab)."""

  def __init__(self, x0, alpha_bars, kind):
    self.x0 = nnx.Variable(jnp.asarray(x0))
    self.table = nnx.Variable(jnp.asarray(alpha_bars, jnp.float32))
    self.kind = kind

  def __call__(self, x, t, *rest):
    index = t if self.kind == "dit" else jnp.round(t * 1000).astype(jnp.int32)
    ab = self.table[...][index][:, None, None, None]
    return (x - jnp.sqrt(ab) * self.x0[...]) / jnp.sqrt(1 - ab)


@pytest.mark.parametrize("kind", ["dit", "cnn"])
def test_samplers_recover_a_point_mass(kind):
  schedule = dit_schedule() if kind == "dit" else cnn_schedule()
  x0 = jnp.asarray(np.random.default_rng(0).uniform(schedule.data_low, schedule.data_high, (1, 28, 28)),
                   jnp.float32)
  model = OracleDenoiser(x0, schedule.alpha_bars, kind)
  noise = jax.random.normal(jax.random.key(0), (2, 1, 28, 28))
  labels = jnp.zeros((2,), jnp.int32) if kind == "dit" else None
  seen = []
  out = ddim_sample(model, schedule, noise, labels, steps=10,
                    group_fn=lambda index: (seen.append(1), jnp.int32(0))[1])
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(x0), out.shape), atol=1e-3)
  assert seen  # the timestep hook is traced
  out = ddpm_sample(model, schedule, noise, labels, key=jax.random.key(1))
  # DDPM keeps some noise from its last noisy step (the CNN rule adds sqrt(beta_2) ~ 0.011 at i = 2).
  assert float(jnp.abs(out - x0).mean()) < 1e-2
  xs, eps, indices = ddpm_trajectory(model, schedule, noise, labels, key=jax.random.key(1), steps=10)
  assert indices.tolist() == list(range(schedule.last_index, schedule.first_index - 1, -100))
  assert xs.shape == eps.shape == (10, 2, 1, 28, 28)
  np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(noise))  # recorded before its step
  for s in (3, 9):  # the recorded eps is the model's at the recorded state
    want = model(xs[s], jnp.full((2,), indices[s]) if kind == "dit" else jnp.full((2,), indices[s] / 1000.0))
    np.testing.assert_allclose(np.asarray(eps[s]), np.asarray(want), rtol=1e-4, atol=1e-4)
  ab = schedule.alpha_bars[indices[-1]]  # the path ends near sqrt(ab) x0, noise of std sqrt(1 - ab) around it
  assert float(jnp.abs(xs[-1] - np.sqrt(ab) * x0).mean()) < np.sqrt(1 - ab)
  with pytest.raises(ValueError, match="divide"):
    ddpm_trajectory(model, schedule, noise, labels, key=jax.random.key(1), steps=7)


def test_timestep_groups():
  config = DiffusionQuantConfig(num_timestep_groups=4)
  assert config.timestep_group(jnp.array([0, 249, 250, 999, 1000])).tolist() == [0, 0, 1, 3, 3]


# ----------------------------------------------------------------------------------------------
# Integer layers


def fake_quantize_activation(x, step, zero, bits):
  """The static quantizer's float simulation: what ActQuantizer computes for one group."""
  return fake_static_codes(x, step, zero, bits) * step


@pytest.mark.parametrize("weight_bits,act_bits,k", [(4, 4, 64), (4, 8, 49), (8, 8, 33)])
def test_integer_linear_matches_fake_quantization(weight_bits, act_bits, k):
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.standard_normal((5, 3, k)) + 0.3, jnp.float32)
  q = jnp.asarray(rng.integers(-(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1), (k, 12)), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.01, 0.05, 12), jnp.float32)
  step, zero = jnp.float32(0.21), jnp.float32(-3.0)
  leaf = make_static_act_weight(q, scale, step, zero, weight_bits=weight_bits, act_bits=act_bits)
  bias = jnp.arange(12, dtype=jnp.float32)
  got = ops.linear(x, leaf, bias)  # the XLA int8 path of StaticActQuantWeight
  want = fake_quantize_activation(x, step, zero, act_bits) @ (q * scale) + bias
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert isinstance(leaf, StaticActQuantWeight) and leaf.shape == (k, 12)
  with pytest.raises(ValueError, match="in_features"):
    ops.linear(x[..., :-1], leaf)


def test_integer_act_matmul_matches_fake_quantization():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.uniform(0, 1, (2, 4, 9, 9)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((2, 4, 9, 16)), jnp.float32)
  sa, za, sb, zb = jnp.float32(1 / 255), jnp.float32(-128.0), jnp.float32(0.3), jnp.float32(1.0)
  got = integer_act_matmul(quantize_activation_int(a, sa, za, 8), sa, za, quantize_activation_int(b, sb, zb, 4), sb, zb)
  want = fake_quantize_activation(a, sa, za, 8) @ fake_quantize_activation(b, sb, zb, 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_token_act_quantizer_codes_are_the_w4ax_activation_codes(bits):
  rng = np.random.default_rng(bits)
  x = jnp.asarray(rng.standard_normal((6, 32)) * rng.uniform(0.1, 10, (6, 1)), jnp.float32)
  x = x.at[2].set(0.0)  # an all-zero token keeps scale 1 and exact zeros
  fake = TokenActQuantizer(bits)(x)
  fmt = formats.ActivationFormat(32, 1 if bits == 8 else 0, 1)
  qx = quantize_act_reference(x, None, fmt)
  if bits == 8:
    codes = jnp.stack([qx.int8_part[0], qx.int8_part[1]], -1).reshape(6, 32)
  else:
    codes = unpack_int4(qx.int4_part, axis=-1)
  scale = qx.scales[0]  # the one block's per-token scale
  np.testing.assert_allclose(np.asarray(fake), np.asarray(codes * scale[:, None]), rtol=1e-6, atol=0)
  assert np.all(np.asarray(fake[2]) == 0)
  assert len(np.unique(np.asarray(fake[0]))) <= 2 ** bits - 1  # symmetric: qmax = 2**(bits-1) - 1
  grad = jax.grad(lambda x: TokenActQuantizer(bits)(x).sum())(x)  # straight-through
  np.testing.assert_allclose(np.asarray(grad), 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("weight_bits,act_bits,group_size,k", [(4, 4, None, 64), (4, 4, 16, 64), (4, 8, 16, 48),
                                                               (8, 8, None, 9), (8, 4, 32, 256)])
def test_token_linear_integer_matches_fake_quantization(weight_bits, act_bits, group_size, k):
  rng = np.random.default_rng(k)
  kernel = jnp.asarray(rng.standard_normal((k, 32)) * 0.1, jnp.float32)
  layer = QuantLinear(kernel, jnp.arange(32, dtype=jnp.float32))
  layer.quant = LinearQuantizer(kernel, weight_bits, act_bits, 4, "token", group_size)
  assert layer.quant.weight.scale[...].shape == ((32,) if group_size is None else (k // group_size, 32))
  x = jnp.asarray(rng.standard_normal((2, 5, k)) + 0.2, jnp.float32)
  fake = layer(x, 0)
  layer.quant.to_integer(layer.kernel[...])
  leaf = layer.quant.integer_leaf(0)
  inner = leaf.inner if isinstance(leaf, InputTransformWeight) else leaf
  assert isinstance(inner, formats.QuantizedWeight) and inner.group_size == group_size
  assert inner.activation.int8_channels == (inner.in_features if act_bits == 8 else 0)
  assert isinstance(leaf, InputTransformWeight) == (k % 2 == 1)  # odd K is zero-padded
  with pytest.raises(ValueError, match=f"(in_features={k}|must have {k} channels)"):
    ops.linear(x[..., :-1], leaf)
  integer = layer(x, 0)
  np.testing.assert_allclose(np.asarray(integer), np.asarray(fake), rtol=1e-5, atol=1e-5)
  if weight_bits == 4:  # the Pallas W4Ax GEMM (interpret mode) computes the same numbers
    pallas = ops.linear(x, leaf, layer.bias[...], implementation="interpret")
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(integer), rtol=1e-5, atol=1e-5)


def test_grouped_weight_scales():
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((64, 8)) * np.repeat(rng.uniform(0.01, 1, (4, 1)), 16, 0), jnp.float32)
  grouped = best_weight_scale(kernel, 4, 16)  # [4, 8]
  for g in range(4):
    np.testing.assert_allclose(np.asarray(grouped[g]), np.asarray(best_weight_scale(kernel[16 * g:16 * (g + 1)], 4)))
  quantizer = WeightQuantizer(kernel, 4, 16)
  values = np.asarray(quantizer.integer_values(kernel))
  assert values.min() >= -8 and values.max() <= 7 and np.all(values == np.round(values))
  grouped_error = float(((quantizer(kernel) - kernel) ** 2).sum())
  per_channel_error = float(((WeightQuantizer(kernel, 4)(kernel) - kernel) ** 2).sum())
  assert grouped_error < 0.5 * per_channel_error  # groups with 100x different ranges
  with pytest.raises(ValueError, match="group_size=24 must divide"):
    WeightQuantizer(kernel, 4, 24)


def test_matmul_quantizer_fake_is_bitwise_integer():
  rng = np.random.default_rng(3)
  quantizer = MatmulQuantizer(8, 4, 2)
  quantizer.lhs.set_range(1, 0.0, 1.0)
  quantizer.rhs.set_range(1, -2.0, 3.0)
  a = jnp.asarray(rng.uniform(0, 1, (2, 3, 7, 9)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((2, 3, 9, 5)), jnp.float32)
  fake = quantizer(a, b, 1)
  quantizer.execution = "integer"
  np.testing.assert_array_equal(np.asarray(quantizer(a, b, 1)), np.asarray(fake))


def test_config_errors():
  with pytest.raises(ValueError, match="weight_bits"):
    DiffusionQuantConfig(weight_bits=5)
  with pytest.raises(ValueError, match="act_bits"):
    DiffusionQuantConfig(act_bits=16)
  with pytest.raises(ValueError, match="act_bits_overrides"):
    DiffusionQuantConfig(act_bits_overrides=(("wq", 16),))
  with pytest.raises(ValueError, match="act_bits_overrides"):
    DiffusionQuantConfig(act_bits_overrides=("wq",))
  with pytest.raises(ValueError, match="act_granularity must be one of"):
    DiffusionQuantConfig(act_granularity="channel")
  with pytest.raises(ValueError, match="weight_group_size must be an even int"):
    DiffusionQuantConfig(act_granularity="token", weight_group_size=15)
  with pytest.raises(ValueError, match="needs act_granularity='token'"):
    DiffusionQuantConfig(weight_group_size=16)
  with pytest.raises(ValueError, match="act_bits must be 4 or 8"):
    LinearQuantizer(jnp.ones((8, 4)), 4, 6, 1, "token").to_integer(jnp.ones((8, 4)))
  with pytest.raises(ValueError, match="rotation must be one of"):
    DiffusionQuantConfig(act_granularity="token", rotation="random")
  with pytest.raises(ValueError, match="rotation needs per-token activations"):
    DiffusionQuantConfig(rotation="hadamard")
  with pytest.raises(ValueError, match="input rotation needs per-token activations"):
    LinearQuantizer(jnp.ones((8, 4)), 4, 4, 1, "tensor", rotation=rotation_blocks(8))


@pytest.mark.parametrize("k,block", [(64, 64), (144, 144), (784, 16), (1568, 32), (18, 2), (9, None), (49, None)])
def test_rotation_blocks(k, block):
  blocks = rotation_blocks(k)
  if block is None:
    assert blocks is None  # odd K: nothing to rotate without padding
    return
  assert blocks.shape == (k // block, block, block) and blocks.dtype == np.float32
  np.testing.assert_allclose(blocks[0] @ blocks[0].T, np.eye(block), atol=1e-5)
  assert np.all(blocks == blocks[:1])
  # signs first, then H: a constant (e.g. post-ReLU mean) input is spread, not piled into one channel
  if block >= 16:  # (H diag(s) would give sqrt(block) in one channel)
    assert np.abs(np.ones(block) @ blocks[0]).max() < 0.75 * np.sqrt(block)


@pytest.mark.parametrize("weight_bits,act_bits,k", [(4, 4, 64), (4, 8, 48), (8, 4, 144)])
def test_rotated_token_linear(weight_bits, act_bits, k):
  """The online rotation keeps the float layer, runs the same numbers fake and integer (and in the Pallas
  GEMM), and cuts the quantization error of an input with an outlier channel."""
  rng = np.random.default_rng(k)
  kernel = jnp.asarray(rng.standard_normal((k, 32)) * 0.1, jnp.float32)
  bias = jnp.arange(32, dtype=jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 5, k)), jnp.float32).at[..., 3].multiply(40.0)
  want = x @ kernel + bias
  blocks = rotation_blocks(k)
  layer = QuantLinear(rotate_kernel(kernel, jnp.asarray(blocks)), bias)
  layer.quant = LinearQuantizer(layer.kernel[...], weight_bits, act_bits, 4, "token", rotation=blocks)
  np.testing.assert_allclose(np.asarray(layer.float_output(x)), np.asarray(want), rtol=1e-4, atol=1e-4)
  fake = layer(x, 0)
  plain = QuantLinear(kernel, bias)
  plain.quant = LinearQuantizer(kernel, weight_bits, act_bits, 4, "token")
  error = lambda y: float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want - bias))
  if act_bits == 4:  # (at A8 the 4-bit weights dominate either way)
    assert error(fake) < 0.8 * error(plain(x, 0))
  layer.quant.to_integer(layer.kernel[...])
  leaf = layer.quant.integer_leaf(0)
  assert isinstance(leaf, InputTransformWeight) and leaf.region.shape == blocks.shape
  integer = layer(x, 0)
  np.testing.assert_allclose(np.asarray(integer), np.asarray(fake), rtol=1e-5, atol=1e-4)
  if weight_bits == 4:
    pallas = ops.linear(x, leaf, bias, implementation="interpret")
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(integer), rtol=1e-5, atol=1e-4)


def test_png_writer_without_pil(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_pil(name, *args, **kwargs):
    if name == "PIL" or name.startswith("PIL."):
      raise ImportError("no PIL")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_pil)
  grid = image_grid(np.random.default_rng(0).uniform(0, 1, (3, 1, 28, 28)), columns=2)
  path = tmp_path / "g.png"
  write_png(path, grid)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = struct.unpack(">II", data[16:24])
  assert (height, width) == grid.shape
  idat_len = struct.unpack(">I", data[33:37])[0]
  raw = zlib.decompress(data[41:41 + idat_len])
  rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
  np.testing.assert_array_equal(rows[:, 1:], grid)
