"""Graph passes: FX rewrites that route a Dynamo graph's nodes to ``torch.ops.flashtune`` ops.

A pass is a module of this package with ``rewrite(gm, ops, options) -> int`` (how many nodes it
routed, of the op families in ``ops``, with ``options`` baked into each call's site). Importing a
pass imports the op module it routes to, which registers those ops. ``moe_layers``,
``moe_gathered``, ``moe_pieces`` and ``fx_nodes`` are not passes: what the MoE pass and all passes
read the graph with. ``training`` runs after the passes on a training graph: it hands routed calls
that tuning finds no faster than ATen back to ATen.
"""

from collections.abc import Callable
from importlib import import_module

# The passes, in the order the backend runs them (MoE first: its batched pattern holds bmm nodes
# the matmul pass would otherwise take; quantized before matmul: its dequantized weights are plain
# tensors the matmul pass would route as linears). A new op family adds its pass module here.
PASSES = ("moe", "quantized", "matmul")

REWRITES: tuple[Callable[..., int], ...] = tuple(import_module(f"{__name__}.{name}").rewrite for name in PASSES)
