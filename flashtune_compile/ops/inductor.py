"""How Inductor's generated code calls our ops: straight into the op's implementation.

Left to itself, Inductor lowers a custom op to a fallback whose generated code calls
``torch.ops.flashtune.<name>.default(...)``: the dispatcher boxes the arguments, finds the op's
Python Autograd-key kernel, which checks grad mode and dispatch modes and then calls the
implementation; some 5-10 us per call. Inductor's graph is already below autograd (AOTAutograd
has taken care of gradients) and runs on real tensors, so none of that is needed there.
``install()`` registers, for each op, a lowering that builds that same fallback node and names the
op's implementation (``registry.IMPLS``), published on Inductor's ``extern_kernels`` namespace as
``flashtune_<name>``, as the Python function the generated code calls. A warm call is then one
Python call, one size read, one dict lookup and the kernel. A graph with Inductor's C++ wrapper
(``cpp_wrapper``) keeps the default: it calls the op through ``torch.ops``.
"""

from __future__ import annotations

import logging
from typing import Any

from .registry import IMPLS, OPS

log = logging.getLogger("flashtune")
_installed: set[str] = set()


def kernel_name(op: str) -> str:
    """The name generated code calls ``op``'s implementation by (on ``extern_kernels``)."""
    return f"flashtune_{op}"


def install() -> None:
    """Register the lowering of every registered op that has none yet (idempotent). If this torch's
    Inductor lacks what it needs, its default fallback (through the dispatcher) stays, with one log line."""
    todo = [name for name in IMPLS if name not in _installed]
    if not todo:
        return
    try:
        from torch._inductor import ir
        from torch._inductor.lowering import fallback_handler, register_lowering
        from torch._inductor.select_algorithm import extern_kernels
    except ImportError as e:  # another torch's layout: the dispatcher path still works
        log.info("flashtune: Inductor will call flashtune ops through the dispatcher (%s)", e)
        _installed.update(todo)
        return
    for name in todo:
        setattr(extern_kernels, kernel_name(name), IMPLS[name])
        overload = OPS[name].overload
        register_lowering(overload, type_promotion_kind=None)(_lowering(overload, name, fallback_handler, ir))
        _installed.add(name)


def _lowering(overload: Any, name: str, fallback_handler: Any, ir: Any) -> Any:
    handler = fallback_handler(overload, add_to_fallback_set=False)
    target = f"extern_kernels.{kernel_name(name)}"

    def lower(*args: Any, **kwargs: Any) -> Any:
        out = handler(*args, **kwargs)
        node = _fallback_of(out, ir)
        if node is not None and not _cpp_wrapper():
            node.python_kernel_name = target  # the Python wrapper calls this
        return out

    return lower


def _cpp_wrapper() -> bool:
    """Whether the graph being lowered gets a C++ wrapper: it calls the op by its own name (through
    ``torch.ops``, which some torch versions require of every op they call back into Python)."""
    from torch._inductor.virtualized import V

    return bool(getattr(V.graph, "cpp_wrapper", False))


def _fallback_of(out: Any, ir: Any) -> Any:
    """The FallbackKernel node behind a lowering's result (a TensorBox over a MultiOutput), or None."""
    node = out
    for _ in range(6):
        if isinstance(node, ir.FallbackKernel):
            return node
        if isinstance(node, ir.MultiOutput):
            node = node.inputs[0]
        elif hasattr(node, "data"):
            node = node.data
        else:
            return None
    return None
