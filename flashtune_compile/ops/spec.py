"""What one tunable op *is*: ``OpSpec`` (``registry.register`` makes it ``torch.ops.flashtune.<name>``).

An op's spec, written next to its code (``ops/matmul.py``, ``ops/moe.py``), is the only place that
says what the op is: its schema, fake implementation and gradient; the ``ops`` option family that
routes it and the operands it serves; how its arguments become the tuner's inputs; its candidate
runners, one line per kernel family with ATen's default first; how its inputs read as a GEMM for the
generic GEMM runners; and, for MoE ops, which inputs carry the routing to synthesize for profiling.
The graph passes, the registration, the runners, the backend's option checks and the
transformers integration all read it.

Every op takes its tensors and scalars, then ``site`` (a string, ``ops/site.py``); its *tuning
inputs* are its arguments less ``site``, with an N-D first input flattened to 2-D rows first when
``flatten_rows`` (as ``F.linear`` does; the result is unflattened).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import FAMILIES
from ..kernels.gemm_view import GemmView
from ..tuner.runner import TunableRunner

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What an operand's dtype must be: "op" (the op's dtype, one of ``OpSpec.dtypes``, the same for every
# "float" (any floating dtype), "int" (any integer dtype), "real" (either), or one dtype's name.
OPERAND_KINDS = ("op", "float", "int", "real")


@dataclass(frozen=True)
class Candidate:
    """One candidate runner of an op: its kernel ``family`` (``kernels.FAMILIES``) and its class,
    built with ``runner.for_op(spec)`` (once per tuner and set of allowed families)."""

    family: str
    runner: type[TunableRunner]

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"candidate family {self.family!r} is not one of kernels.FAMILIES {FAMILIES}")


@dataclass(frozen=True)
class OpSpec:
    """Everything flashtune knows of one tunable op (see the module docstring).

    ``operands``: per tensor argument, in schema order, (kind, min rank, max rank or None) with kind
    from ``OPERAND_KINDS``. ``backward(ctx, grad)``: the autograd formula (an
    ``autograd.Function.backward``; ``ctx.saved_tensors`` holds the tensor arguments, ``ctx.scalars``
    the others). Without one, a call that needs a gradient runs ``reference`` (ATen ops, recorded by
    autograd) and passes route the op only where no gradient is needed. ``token_dims``: the
    (input, dim) positions of the token count in the tuning inputs, for callers without symbolic
    shapes. ``check(*inputs)``: raises ValueError naming a bad input; run on each new size.
    """

    name: str
    schema: str
    family: str
    fake: Callable[..., Any]
    candidates: tuple[Candidate, ...]
    operands: tuple[tuple[str, int, int | None], ...]
    backward: Callable[..., Any] | None = None
    reference: Callable[..., Any] | None = None
    flatten_rows: bool = False
    token_dims: tuple[tuple[int, int], ...] = ((0, 0),)
    gemm: GemmView | None = None
    routing: Any = None  # ops/routing.RoutedInputs for ops profiled on synthetic MoE routing
    check: Callable[..., None] | None = None
    # Argument positions holding model state even when they are not parameters (a quantized
    # weight's integers and scales, often buffers or a subclass's inner tensors): the backend marks
    # them so the weight cache keeps copies of them (``WeightCache.mark_state``).
    state_args: tuple[int, ...] = ()
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    # Read off the schema: how many tuning inputs (arguments less ``site``), where the tensor
    # arguments are, and per tensor argument its name if it is required (None if optional).
    num_inputs: int = field(init=False, repr=False, compare=False)
    tensor_args: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _required: tuple[str | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        args = torch._C.parse_schema(f"flashtune::{self.schema}").arguments
        object.__setattr__(self, "num_inputs", len(args) - 1)
        tensors = tuple(i for i, a in enumerate(args) if "Tensor" in str(a.type))
        object.__setattr__(self, "tensor_args", tensors)
        object.__setattr__(
            self, "_required", tuple(None if "Optional" in str(args[i].type) else args[i].name for i in tensors)
        )
        if self.schema.split("(", 1)[0] != self.name or not args or args[-1].name != "site":
            raise ValueError(f"OpSpec {self.name!r}: the schema must be '{self.name}(..., str site) -> ...'")
        if len(self.operands) != len(self.tensor_args):
            raise ValueError(f"OpSpec {self.name!r}: one operand rule per tensor argument {self.tensor_args}")
        if (self.backward is None) == (self.reference is None):
            raise ValueError(f"OpSpec {self.name!r}: give exactly one of backward and reference")
        if not self.candidates or self.candidates[0].family != "aten":
            raise ValueError(f"OpSpec {self.name!r}: the first candidate is the ATen default")

    @property
    def overload(self) -> Any:
        """``torch.ops.flashtune.<name>.default``, the op ``registry.register`` defines."""
        return getattr(torch.ops.flashtune, self.name).default

    def tuning_shapes(self, shapes: Sequence[Any]) -> list:
        """The tuning inputs' shapes from the arguments' shapes (ints or SymInts; None for
        non-tensors): the first flattened to 2-D rows with ``flatten_rows``."""
        out = [tuple(s) if s is not None else None for s in shapes]
        if self.flatten_rows and out[0] is not None and len(out[0]) != 2:
            rows = 1
            for size in out[0][:-1]:
                rows = rows * size
            out[0] = (rows, out[0][-1])
        return out

    def serves(self, values: Sequence[Any], out_dtype: torch.dtype | None = None) -> str | None:
        """None if the op serves a call with these tensor arguments (tensors or fake tensors, None
        for an absent optional one) and output dtype, else why not. Reads metadata only (and plain
        Python data: Dynamo can trace it)."""
        present = [v for v in values if v is not None]
        for name, v in zip(self._required, values):
            if v is None and name is not None:
                return f"argument {name!r} is missing"
        if len({v.device for v in present}) != 1 or present[0].device.type not in ("cpu", "cuda"):
            return f"device {sorted({str(v.device) for v in present})} not served"
        if any(v.layout != torch.strided for v in present):
            return "non-strided layout"
        op_dtypes = {v.dtype for v, (kind, _, _) in zip(values, self.operands) if v is not None and kind == "op"}
        if len(op_dtypes) != 1 or next(iter(op_dtypes)) not in self.dtypes:
            return f"dtype {sorted(map(str, op_dtypes))} not served"
        if out_dtype is not None and out_dtype not in op_dtypes:
            return f"output dtype {out_dtype} differs from the operands' {next(iter(op_dtypes))}"
        for v, (kind, lo, hi) in zip(values, self.operands):
            if v is None:
                continue
            if not lo <= v.dim() <= (hi if hi is not None else v.dim()):
                return f"operand rank {v.dim()} (needs {lo}..{hi if hi is not None else ''})"
            if kind == "float" and not v.is_floating_point():
                return f"operand dtype {v.dtype} (needs a floating dtype)"
            if kind == "int" and (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool):
                return f"operand dtype {v.dtype} (needs an integer dtype)"
            if kind == "real" and (v.is_complex() or v.dtype == torch.bool):
                return f"operand dtype {v.dtype} (needs a real dtype)"
            if kind not in OPERAND_KINDS and str(v.dtype) != f"torch.{kind}":
                return f"operand dtype {v.dtype} (needs {kind})"
        if self.backward is None and torch.is_grad_enabled() and any(v.requires_grad for v in present):
            return "a gradient is needed (this op is routed for inference only)"
        return None
