"""The matmul and attention entry points models call, dispatching on the operand's type and the
implementation ("auto" | "xla" | "pallas" | "interpret"); the rule is in `cometjax.ops.registry`.

- `linear(x, weight, bias, implementation=...)`: float or quantized weight leaves (`ops.dense`);
  `linears(x, weights, biases)`: several projections of one input, sharing a quantized input where they can.
- `attention_kv4`, `attention_paged_kv4`: attention over INT4 KV caches (`ops.kv_attention`).
"""

from cometjax.ops.dense import linear, linears
from cometjax.ops.kv_attention import attention_kv4, attention_paged_kv4
from cometjax.ops.registry import IMPLEMENTATIONS, UnsupportedError, check_implementation, register, resolve

__all__ = ["IMPLEMENTATIONS", "UnsupportedError", "attention_kv4", "attention_paged_kv4", "check_implementation",
           "linear", "linears", "register", "resolve"]
