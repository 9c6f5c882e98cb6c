"""QuaRot-style orthogonal rotations of a Llama model, exact in float arithmetic.

What `rotate_llama` does (every step leaves the float model's function unchanged):
1. Fold each RMSNorm weight into the linears that read it (q/k/v for input_layernorm, gate/up for
   post_attention_layernorm, lm_head for the final norm) and set the norm weights to 1. A tied lm_head
   becomes an explicit one (diag(norm) E^T), because the embedding and the classifier no longer match.
2. Rotate the residual stream by an orthogonal Q [d, d]: E <- E Q; readers W <- Q^T W; writers
   (o_proj, down_proj) W <- W Q. RMSNorm commutes with Q (it preserves the norm), so the network is the
   same function. Q is a randomized Hadamard matrix H diag(+-1) / sqrt(d) when a Hadamard matrix of
   order d can be built here (`cometjax.core.rotations`), else a random orthogonal matrix.
3. Rotate each head's value/output pair by one Hadamard matrix of order head_dim: v_proj columns of
   every KV head <- W H, o_proj rows of every query head <- H^T W (attention is linear in V per head).
The down_proj input (after the SwiGLU product) cannot be rotated offline; `online_rotation` gives the
signed Hadamard rotation that the quantized leaf applies to its input at run time by a fast transform
(x -> pad -> x R, with W <- R^T W; only the signs are stored), over the input padded up to a size where a
Hadamard matrix exists.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cometjax.core.rotations import HadamardRotation, orthogonal
from cometjax.models.llama import abstract_llama


def residual_rotation(dim: int, seed: int = 0) -> np.ndarray:
  return orthogonal(dim, seed)


def online_rotation(padded_features: int, seed: int = 1) -> HadamardRotation:
  """The run-time input rotation of down_proj over its zero-padded input: one signed Hadamard block."""
  return HadamardRotation.create(padded_features, padded_features, seed)


# ------------------------------------------------------------------------------------------------
# Model transform


def rotate_llama(model, seed: int = 0):
  """The rotated float Llama (norms folded, residual and V/O rotated); see the module docstring."""
  config = model.config
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  f64 = lambda a: np.asarray(a, np.float64)
  q = residual_rotation(config.hidden_size, seed)  # [d, d]
  hd = config.resolved_head_dim
  head_rotation = orthogonal(hd, seed + 7)

  new_config = config.replace(tie_word_embeddings=False)
  out = nnx.to_pure_dict(nnx.split(abstract_llama(new_config))[1])
  embedding = f64(pure["embed_tokens"])
  out["embed_tokens"] = embedding @ q
  final_norm = f64(pure["norm"]["weight"])
  lm_head = embedding.T if config.tie_word_embeddings else f64(pure["lm_head"]["kernel"])  # [d, vocab]
  out["lm_head"]["kernel"] = q.T @ (final_norm[:, None] * lm_head)
  out["norm"]["weight"] = np.ones_like(final_norm)
  for i in range(config.num_layers):
    src, dst = pure["layers"][i], out["layers"][i]
    attn_norm = f64(src["input_layernorm"]["weight"])
    mlp_norm = f64(src["post_attention_layernorm"]["weight"])
    dst["input_layernorm"]["weight"] = np.ones_like(attn_norm)
    dst["post_attention_layernorm"]["weight"] = np.ones_like(mlp_norm)
    for name in ("q_proj", "k_proj", "v_proj"):
      dst["self_attn"][name] = dict(src["self_attn"][name])
      dst["self_attn"][name]["kernel"] = q.T @ (attn_norm[:, None] * f64(src["self_attn"][name]["kernel"]))
    v = dst["self_attn"]["v_proj"]
    v["kernel"] = (v["kernel"].reshape(-1, config.num_kv_heads, hd) @ head_rotation).reshape(v["kernel"].shape)
    if v.get("bias") is not None:
      v["bias"] = (f64(v["bias"]).reshape(config.num_kv_heads, hd) @ head_rotation).reshape(-1)
    o = dict(src["self_attn"]["o_proj"])
    w_o = f64(o["kernel"]).reshape(config.num_heads, hd, -1)  # [heads, hd, d]
    w_o = np.einsum("ji,hjd->hid", head_rotation, w_o).reshape(config.num_heads * hd, -1)
    o["kernel"] = w_o @ q
    if o.get("bias") is not None:
      o["bias"] = f64(o["bias"]) @ q
    dst["self_attn"]["o_proj"] = o
    for name in ("gate_proj", "up_proj"):
      dst["mlp"][name] = dict(src["mlp"][name])
      dst["mlp"][name]["kernel"] = q.T @ (mlp_norm[:, None] * f64(src["mlp"][name]["kernel"]))
    down = dict(src["mlp"]["down_proj"])
    down["kernel"] = f64(down["kernel"]) @ q
    if down.get("bias") is not None:
      down["bias"] = f64(down["bias"]) @ q
    dst["mlp"]["down_proj"] = down
  dtype = config.dtype
  out = _map_leaves(out, lambda a: jnp.asarray(a, dtype))
  graphdef, new_state = nnx.split(abstract_llama(new_config))
  nnx.replace_by_pure_dict(new_state, out)
  return nnx.merge(graphdef, new_state)


def _map_leaves(tree, fn):
  if isinstance(tree, dict):
    return {k: _map_leaves(v, fn) for k, v in tree.items()}
  return None if tree is None else fn(tree)
