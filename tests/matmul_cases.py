"""Random matmul-family calls, as users write them, for the property test (test_edge_inputs.py)
and its long run (benchmarks/fuzz_matmul.py).

A case is a form (``F.linear``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul`` of ranks 1-4,
``x @ w.t()``), sizes drawn from {0, 1, 2, 3, 5, 8}, a dtype, a layout per operand (contiguous,
transposed, strided slice, stride-0 expanded), and whether operands require grad. ``check`` runs
it eagerly and through ``backend="flashtune"`` and compares both against float64: compiled must
raise where eager raises, and otherwise be as close to float64 as eager is, in forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

SIZES = st.sampled_from([0, 1, 2, 3, 5, 8])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


def _form_fns() -> dict[str, Any]:
    return {
        "linear": lambda x, w: F.linear(x, w),
        "linear_bias": lambda x, w, b: F.linear(x, w, b),
        "mm": lambda a, b: torch.mm(a, b),
        "addmm": lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
        "bmm": lambda a, b: torch.bmm(a, b),
        "baddbmm": lambda c, a, b: torch.baddbmm(c, a, b, beta=0.25, alpha=3.0),
        "matmul": lambda a, b: torch.matmul(a, b),
        "at_t": lambda x, w: x @ w.t(),
    }


FORMS = _form_fns()


@dataclass(frozen=True)
class Case:
    form: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    layouts: tuple[str, ...]
    grad: tuple[bool, ...]
    dynamic: bool
    seed: int

    def inputs(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return [make(shape, self.dtype, layout, g) for shape, layout in zip(self.shapes, self.layouts)]


def make(shape: tuple[int, ...], dtype: torch.dtype, layout: str, g: torch.Generator) -> torch.Tensor:
    """A tensor of ``shape`` with the given memory layout (values ~ N(0, 1), exact in every dtype's
    range); ``expanded`` has stride 0 in its first dim when that dim is > 1."""
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(dtype)
        return base.transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=g).to(dtype)
        return base[..., 1::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 1:
        return torch.randn(1, *shape[1:], generator=g).to(dtype).expand(*shape)
    return torch.randn(*shape, generator=g).to(dtype)


@st.composite
def cases(draw: Any) -> Case:
    form = draw(st.sampled_from(sorted(FORMS)))
    m, k, n, b = draw(SIZES), draw(SIZES), draw(SIZES), draw(st.sampled_from([1, 2, 3]))
    lead = tuple(draw(st.lists(st.sampled_from([1, 2, 3]), max_size=2)))
    if form in ("linear", "at_t"):
        shapes = ((*lead, m, k), (n, k))
    elif form == "linear_bias":
        shapes = ((*lead, m, k), (n, k), (n,))
    elif form == "mm":
        shapes = ((m, k), (k, n))
    elif form == "addmm":
        bias = draw(st.sampled_from([(n,), (m, n), (1, n)]))
        shapes = (bias, (m, k), (k, n))
    elif form == "bmm":
        shapes = ((b, m, k), (b, k, n))
    elif form == "baddbmm":
        bias = draw(st.sampled_from([(b, m, n), (1, m, n), (n,)]))
        shapes = (bias, (b, m, k), (b, k, n))
    else:  # matmul: ranks 1-4 on each side, broadcasting batch dims
        ra, rb = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        batch = tuple(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=2, max_size=2)))
        a = (k,) if ra == 1 else (*batch[: ra - 2], m, k)
        bb = (k,) if rb == 1 else (*draw(st.sampled_from([batch, (1, batch[1]), (batch[1],)]))[: rb - 2], k, n)
        shapes = (a, bb)
    dtype = draw(st.sampled_from(DTYPES))
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in shapes)
    grad = tuple(draw(st.booleans()) for _ in shapes)
    return Case(form, shapes, dtype, layouts, grad, draw(st.booleans()), draw(st.integers(0, 2**16)))


def _run(fn: Any, inputs: list[torch.Tensor], grad: tuple[bool, ...], seed: int) -> tuple[Any, list]:
    """fn's output and the gradients of sum(out * r) w.r.t. the inputs that require grad."""
    leaves = [x.detach().requires_grad_(g) if x.is_floating_point() else x for x, g in zip(inputs, grad)]
    out = fn(*leaves)
    grads: list = []
    if any(grad) and out.requires_grad:
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
        grads = list(torch.autograd.grad((out * weight).sum(), [x for x, g in zip(leaves, grad) if g]))
    return out.detach(), grads


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def check(case: Case, inner: str = "eager") -> str:
    """Eager and compiled agree: both raise ("raised"), or compiled is within eager's own error (vs
    float64) of float64, for the output and every input gradient ("ok"); else AssertionError."""
    fn = FORMS[case.form]
    inputs = case.inputs()
    try:
        eager = _run(fn, inputs, case.grad, case.seed)
    except Exception as e:  # eager refuses the call: compiled must refuse it too
        compiled_fn = torch.compile(fn, backend="flashtune", options={"inner": inner}, dynamic=case.dynamic)
        try:
            _run(compiled_fn, inputs, case.grad, case.seed)
        except Exception:
            return "raised"
        raise AssertionError(f"eager raised {type(e).__name__}: {e}; compiled did not") from None
    reference = _run(fn, [x.double() for x in inputs], case.grad, case.seed)
    compiled_fn = torch.compile(fn, backend="flashtune", options={"inner": inner}, dynamic=case.dynamic)
    compiled = _run(compiled_fn, inputs, case.grad, case.seed)
    for what, e, c, r in _pairs(eager, compiled, reference):
        assert c.shape == e.shape and c.dtype == e.dtype, f"{what}: {c.shape} {c.dtype} vs eager {e.shape} {e.dtype}"
        if e.numel() == 0:
            continue
        scale = r.abs().max().item()
        allowed = 2 * (e.double() - r).abs().max().item() + 8 * _eps(case.dtype) * (scale + 1)
        err = (c.double() - r).abs().max().item()
        assert err <= allowed, f"{what}: compiled is off float64 by {err:.3g}, eager by at most {allowed:.3g}"
    return "ok"


def _pairs(eager: tuple, compiled: tuple, reference: tuple) -> list[tuple[str, Any, Any, Any]]:
    (eo, eg), (co, cg), (ro, rg) = eager, compiled, reference
    assert len(cg) == len(eg), f"compiled gave {len(cg)} gradients, eager {len(eg)}"
    return [("output", eo, co, ro)] + [(f"grad {i}", e, c, r) for i, (e, c, r) in enumerate(zip(eg, cg, rg))]
