"""Walking a model's pure state dict (`nnx.to_pure_dict`): where the linear layers and the other leaves are.

Layer names are dotted paths: "layers.3.self_attn.q_proj", "lm_head"; a path is the tuple of keys.
"""

from __future__ import annotations

from cometjax.core.formats import is_quantized_leaf


def dotted(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def linear_layers(pure: dict, prefix: tuple = ()) -> dict[str, tuple]:
  """Dotted layer name -> path in a pure state dict, for every node holding a "kernel"."""
  found = {}
  if isinstance(pure, dict):
    if "kernel" in pure:
      found[dotted(prefix)] = prefix
    for key, value in pure.items():
      if isinstance(value, dict):
        found.update(linear_layers(value, prefix + (key,)))
  return found


def node_at(pure: dict, path: tuple):
  """The value at `path` in a nested dict."""
  for key in path:
    pure = pure[key]
  return pure


def float_leaves(pure: dict, prefix: tuple = ()) -> dict[str, tuple]:
  """Dotted name -> path of every leaf that is neither None nor a quantized leaf."""
  out = {}
  for key, value in pure.items():
    path = prefix + (key,)
    if isinstance(value, dict):
      out.update(float_leaves(value, path))
    elif value is not None and not is_quantized_leaf(value):
      out[dotted(path)] = path
  return out
