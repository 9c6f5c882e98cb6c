"""Orthogonal matrices for rotating activations, and their block-diagonal application.

Normalizations are in the names: `hadamard_pm1(n)` has entries +-1 (H H^T = n I); `hadamard_orthonormal(n)`
is H / sqrt(n) (H H^T = I). Orders built here: 2**a * m with m = 1 (Sylvester) or m a Paley-I order
(m - 1 a prime = 3 mod 4): 12, 20, 24, 576 = 8 * 72, 1536 = 128 * 12, but not 172; `hadamard_exists(n)` says
which. H(2**a * m) = kron(Sylvester(2**a), Paley(m)).

Rotations that store (almost) nothing (`HadamardRotation`): x -> blocks of b channels, each
(x_block * s_block) @ H(b) / sqrt(b), with signs s = +-1 (int8, one per channel) the only stored array. It is
applied as a fast Walsh-Hadamard transform over the 2**a factor (log2(2**a) butterfly passes) and a dense
m x m product over the Paley factor (m <= a few dozen; no matrix is stored, Paley's is a fixed construction):
O(b (log b + m)) work per block instead of b**2. One block over all channels is QuaRot's online rotation;
blocks of the FMPQ block size rotate each activation block under its own per-token scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _is_prime(n: int) -> bool:
  if n < 2:
    return False
  return all(n % p for p in range(2, int(n**0.5) + 1))


def _paley_order(m: int) -> bool:
  """Whether Paley construction I gives a Hadamard matrix of order m (m - 1 prime, = 3 mod 4)."""
  return m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3


def _factor(n: int) -> tuple[int, int] | None:
  """(2**a, m) with n = 2**a * m and m = 1 or a Paley I order; None when no such split exists."""
  power = 1
  while n % (2 * power) == 0:
    power *= 2
  p = power  # the largest power of two first keeps the Paley part small
  while p >= 1:
    m = n // p
    if m == 1 or _paley_order(m):
      return p, m
    p //= 2
  return None


def hadamard_exists(n: int) -> bool:
  """Whether `hadamard_pm1(n)` can build order n (Sylvester powers of two times a Paley I order)."""
  return n >= 1 and _factor(n) is not None


def _paley(m: int) -> np.ndarray:
  q = m - 1
  residues = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)], np.float64)
  jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # [q, q]
  core = np.zeros((m, m))
  core[0, 1:] = 1.0
  core[1:, 0] = -1.0
  core[1:, 1:] = jacobsthal
  return core + np.eye(m)


@functools.lru_cache(maxsize=32)
def _hadamard_pm1(n: int) -> np.ndarray:
  split = _factor(n) if n >= 1 else None
  if split is None:
    raise ValueError(f"no Hadamard matrix of order {n} is built here: n must be 2**a * m with m = 1 or m - 1 a "
                     f"prime = 3 mod 4; got n={n}")
  power, m = split
  h = np.ones((1, 1))
  h2 = np.array([[1.0, 1.0], [1.0, -1.0]])
  while h.shape[0] < power:
    h = np.kron(h, h2)
  if m > 1:
    h = np.kron(h, _paley(m))
  h.setflags(write=False)
  return h


def hadamard_pm1(n: int) -> np.ndarray:
  """A +-1 Hadamard matrix of order n (H H^T = n I), float64 [n, n]; Sylvester's for powers of two
  (symmetric)."""
  return _hadamard_pm1(n).copy()


def hadamard_orthonormal(n: int) -> np.ndarray:
  """H / sqrt(n), float64 [n, n]: orthonormal; for powers of two symmetric and its own inverse."""
  return _hadamard_pm1(n) / np.sqrt(n)


def hadamard_size_at_least(n: int, multiple_of: int = 1) -> int:
  """The smallest size >= n that is a multiple of `multiple_of` and has a Hadamard matrix."""
  if n < 1 or multiple_of < 1:
    raise ValueError(f"n and multiple_of must be positive, got n={n}, multiple_of={multiple_of}")
  size = -(-n // multiple_of) * multiple_of
  while not hadamard_exists(size):
    size += multiple_of
  return size


def random_hadamard(n: int, seed: int) -> np.ndarray:
  """Orthogonal H diag(s) / sqrt(n) with random signs s, float64 [n, n]."""
  signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
  return _hadamard_pm1(n) * signs[None, :] / np.sqrt(n)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
  """A random orthogonal matrix (QR of a Gaussian, signs fixed), float64 [n, n]."""
  q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  return q * np.sign(np.diag(r))[None, :]


def orthogonal(n: int, seed: int) -> np.ndarray:
  """A randomized Hadamard matrix of order n where one is built here, else a random orthogonal one."""
  return random_hadamard(n, seed) if hadamard_exists(n) else random_orthogonal(n, seed)


def apply_block_rotation(x: jax.Array, blocks: jax.Array) -> jax.Array:
  """x [..., C * b] -> each consecutive chunk i of b channels times blocks[i] ([C, b, b])."""
  chunks, b, _ = blocks.shape
  if x.shape[-1] != chunks * b:
    raise ValueError(f"x must have {chunks} * {b} = {chunks * b} channels in its last axis, got shape {x.shape}")
  x = jnp.einsum("...cb,cbd->...cd", x.reshape(*x.shape[:-1], chunks, b), blocks.astype(x.dtype))
  return x.reshape(*x.shape[:-2], chunks * b)


def rotate_rows(kernel: jax.Array, blocks: jax.Array) -> jax.Array:
  """kernel [K, N] -> R^T kernel for R = blockdiag(blocks), so that (x R) @ (R^T kernel) = x @ kernel."""
  chunks, b, _ = blocks.shape
  rotated = jnp.einsum("cbd,cbn->cdn", blocks.astype(kernel.dtype), kernel.reshape(chunks, b, -1))
  return rotated.reshape(kernel.shape)


# ------------------------------------------------------------------------------------------------
# Signed block Hadamard rotations, applied fast


def hadamard_factors(n: int) -> tuple[int, int]:
  """(2**a, m) with n = 2**a * m and H(n) = kron(Sylvester(2**a), Paley(m)) (m = 1: pure Sylvester)."""
  split = _factor(n) if n >= 1 else None
  if split is None:
    raise ValueError(f"no Hadamard matrix of order {n} is built here: n must be 2**a * m with m = 1 or m - 1 a "
                     f"prime = 3 mod 4; got n={n}")
  return split


def random_signs(n: int, seed: int) -> np.ndarray:
  """int8 [n] of +-1 (numpy's PCG64 stream: stored with the weight, never regenerated at load time)."""
  return np.random.default_rng(seed).choice(np.array([-1, 1], np.int8), size=n)


def fast_hadamard_transform(x: jax.Array, n: int) -> jax.Array:
  """x [..., n] -> x @ hadamard_pm1(n) (unnormalized), by butterflies over the power-of-two factor and one
  m x m product over the Paley factor."""
  power, m = hadamard_factors(n)
  lead = x.shape[:-1]
  y = x.reshape(*lead, power, m)
  half = 1
  while half < power:  # Sylvester butterflies: pairs (i, i + half) within runs of 2 * half
    y = y.reshape(*lead, power // (2 * half), 2, half, m)
    a, b = y[..., 0, :, :], y[..., 1, :, :]
    y = jnp.stack([a + b, a - b], axis=-3)
    half *= 2
  y = y.reshape(*lead, power, m)
  if m > 1:
    y = jnp.einsum("...pi,ij->...pj", y, jnp.asarray(_paley(m), y.dtype))
  return y.reshape(*lead, n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HadamardRotation:
  """Block-diagonal signed Hadamard rotation (module docstring): R = blockdiag_c(diag(s_c) H(b) / sqrt(b)).

  x [..., C * b] -> x @ R; orthogonal, so a weight W becomes R^T W (`matrix()` gives R for that, float64).
  """

  signs: jax.Array  # int8 [C * b] of +-1
  block: int = dataclasses.field(metadata=dict(static=True))

  def __post_init__(self):
    if not isinstance(self.block, int) or not hadamard_exists(self.block):
      raise ValueError(f"HadamardRotation.block must be an order with a Hadamard matrix here, got {self.block!r}")

  @classmethod
  def create(cls, features: int, block: int, seed: int) -> "HadamardRotation":
    if block < 1 or features % block:
      raise ValueError(f"block={block} must divide the rotated features={features}")
    return cls(signs=jnp.asarray(random_signs(features, seed)), block=block)

  @property
  def features(self) -> int:
    return self.signs.shape[0]

  def apply(self, x: jax.Array) -> jax.Array:
    """x [..., C * b] -> x @ R in x's dtype (computed in f32 at least)."""
    n, b = self.features, self.block
    if x.shape[-1] != n:
      raise ValueError(f"x must have {n} channels in its last axis for this rotation, got shape {x.shape}")
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = x.astype(compute) * self.signs.astype(compute)
    y = fast_hadamard_transform(y.reshape(*x.shape[:-1], n // b, b), b) / np.sqrt(b)
    return y.reshape(x.shape).astype(x.dtype)

  def matrix(self) -> np.ndarray:
    """R, float64 [C * b, C * b] (dense; for the offline weight transform only)."""
    signs = np.asarray(self.signs, np.float64)
    h = hadamard_orthonormal(self.block)
    out = np.zeros((self.features, self.features))
    for c in range(self.features // self.block):
      lo = c * self.block
      out[lo:lo + self.block, lo:lo + self.block] = signs[lo:lo + self.block, None] * h
    return out

  @property
  def nbytes(self) -> int:
    return int(self.signs.nbytes)
