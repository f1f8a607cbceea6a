"""``ft.freeze(model)``: every ``nn.Linear`` weight of a CPU model stored once, in the packed layout
the CPU kernel streams fastest, instead of the original.

A copy of a weight beside the original doubles what the weight costs; frozen, the packed layout
*replaces* it: the parameter is dropped and the module keeps the pack (a buffer), so the model
needs the memory of one copy and runs every token count at the packed kernel's speed. It is
Inductor's freezing promise: a frozen weight no longer changes. Each ``nn.Linear`` whose weight is
a CPU fp32/bf16/fp16 parameter of its own becomes a ``FrozenLinear``:

- its forward calls ``torch.ops.flashtune.packed_linear`` (tuned per bucket like every op, in
  eager mode and under ``torch.compile``, where the backend gives the call the compile's options);
- ``module.weight`` no longer exists (AttributeError: nothing can read the pack as if it were the
  weight, or write it); ``state_dict()`` holds the weight unpacked, ``load_state_dict`` packs what
  it loads, and ``.to()`` / ``.half()`` refuse with a clear error;
- ``ft.unfreeze(model)`` puts the parameters back, with the same values.

A weight also used elsewhere keeps its layout: tied weights (an embedding and an output projection
sharing one parameter), a weight two modules own, or any parameter outside an ``nn.Linear``. The
report says which and why. A weight that something outside the model still references (an
optimizer, a user's variable) cannot be freed: the report counts its bytes as not freed.

The layout (vectors per block, and bf16 pairs for ``vdpbf16ps``) is chosen per weight shape and
dtype by timing the kernel on the first weight of that shape at 1 and 16 tokens, cold
(``layout="auto"``); ``layout=(r, pairs)`` fixes it.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .kernels.cpp import blocked_gemm_or_none, load_blocked_gemm, unpack
from .ops.matmul import PACKED_LINEAR
from .ops.site import SiteOptions, site_string
from .tuner.profiler import ProfilerSettings, time_cpu

log = logging.getLogger("flashtune")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class FreezeReport:
    """What ``freeze`` did; prints as a summary.

    Args:
        frozen: modules frozen.
        packed_bytes: bytes of weights replaced by packs.
        freed_bytes: how many of those bytes were freed.
        layouts: the layout ``(r, pairs)`` chosen per (shape, dtype).
        kept: the linears left as they were, as (name, why).
        seconds: how long ``freeze`` took.

    Raises:
        Nothing (a dataclass).

    Example::

        report = ft.freeze(model)
        print(report.frozen, report.kept)
    """

    frozen: int = 0
    packed_bytes: int = 0
    freed_bytes: int = 0
    layouts: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    kept: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"froze {self.frozen} linear(s) in {self.seconds:.1f}s: {self.packed_bytes / 1e9:.2f} GB of weights now "
            f"stored packed, {self.freed_bytes / 1e9:.2f} GB of originals freed"
        ]
        for (shape, dtype), (r, p) in self.layouts.items():
            lines.append(f"  layout for {list(shape)} {dtype}: {r} vectors per block, pairs {p}")
        lines += [f"  kept {name}: {why}" for name, why in self.kept]
        return "\n".join(lines)


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored only as the CPU kernel's pack (``packed``); see the
    module docstring. Made by ``freeze``, undone by ``unfreeze``."""

    packed: torch.Tensor
    pairs: int
    site: str
    frozen_requires_grad: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.flashtune.packed_linear(rows, self.packed, self.bias, self.out_features, self.pairs, self.site)
        return y.view(*x.shape[:-1], self.out_features)

    def unpacked_weight(self) -> torch.Tensor:
        """The weight as ``nn.Linear`` held it (a new tensor)."""
        return unpack(self.packed, self.out_features, self.in_features, self.pairs)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight frozen packed by flashtune (ft.unfreeze restores it)"

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.unpacked_weight()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the frozen weight is "
                    f"{(self.out_features, self.in_features)}"
                )
            else:
                kernel = load_blocked_gemm()
                r = self.packed.shape[2] // ((2 if self.pairs else 1) * kernel.vector_width)
                with torch.no_grad():
                    self.packed.copy_(kernel.pack(w.to(self.packed.dtype), r, bool(self.pairs)))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001  (nn.Module's signature)
        moved = fn(self.packed)
        if moved.device != self.packed.device or moved.dtype != self.packed.dtype:
            raise RuntimeError(
                "flashtune: this Linear's weight is frozen in a packed CPU layout (ft.freeze); call "
                "ft.unfreeze(model) before moving it to another device or dtype"
            )
        return super()._apply(fn, recurse)


@functools.cache
def _site(k: int, packed_shape: tuple, dtype: str, bias: bool) -> str:
    """The site of a frozen linear's call in eager mode (the token count its one dynamic axis);
    under torch.compile the backend replaces it with one carrying the compile's options."""
    shapes = [(0, k), packed_shape, (packed_shape[0],) if bias else None, None, None]
    dtypes = [dtype, dtype, dtype if bias else None, None, None]
    options = SiteOptions()
    return site_string(PACKED_LINEAR, ((((0, 0),), 1, options.max_tokens),), shapes, dtypes, options)


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter's id -> the names it has in the model (several for a shared one)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _why_kept(name: str, module: nn.Linear, owners: dict[int, list[str]]) -> str | None:
    w = module.weight
    if type(module) is not nn.Linear:
        return f"a {type(module).__name__}, not an nn.Linear"
    if not isinstance(w, nn.Parameter) or w.device.type != "cpu" or w.dtype not in DTYPES or w.dim() != 2:
        return f"its weight is not a CPU parameter of {[str(d).removeprefix('torch.') for d in DTYPES]}"
    if len(owners.get(id(w), ())) > 1:
        return f"its weight is shared with {[n for n in owners[id(w)] if n != name + '.weight']} (tied)"
    if module.bias is not None and module.bias.dtype != w.dtype:
        return "its bias has another dtype than its weight"
    return None


LAYOUT_ROWS = 4096  # rows of a weight the layouts are timed on: enough to stream past the caches


def _layout(kernel: Any, w: torch.Tensor) -> tuple[int, int]:
    """The (vectors per block, pairs) the blocked kernel streams ``w`` fastest with, at 1 and 16
    tokens (geometric mean of cold medians), timed on its first ``LAYOUT_ROWS`` rows so that the
    trial packs of a large weight (an output projection of 1 GB) cost little memory."""
    w = w[:LAYOUT_ROWS]
    widths = sorted({r for _, r in kernel.tiles})
    kinds = (0, 1) if kernel.bf16_pairs and w.dtype == torch.bfloat16 else (0,)
    layouts = [(r, p) for r in widths for p in kinds]
    if len(layouts) == 1:
        return layouts[0]
    xs = {m: torch.randn(m, w.shape[1]).to(w.dtype) for m in (1, 16)}
    fns, keys = [], []
    for r, p in layouts:
        packed = kernel.pack(w, r, bool(p))
        for m, x in xs.items():
            mr = max(h for h, width in kernel.tiles if width == r and h <= max(1, min(m, 8)))
            fns.append(functools.partial(kernel.linear, x, packed, None, w.shape[0], mr, r, 1, bool(p)))
            keys.append((r, p))
    for fn in fns:
        fn()
    times = time_cpu(fns, ProfilerSettings(rounds=7, min_rounds=5, max_seconds=1.0))
    score: dict[tuple[int, int], float] = {}
    for key, t in zip(keys, times):
        score[key] = score.get(key, 0.0) + math.log(t.median)
    return min(score, key=score.__getitem__)


def freeze(model: nn.Module, layout: str | Sequence[int] = "auto") -> FreezeReport:
    """Store every eligible ``nn.Linear`` weight of ``model`` only in the CPU kernel's packed layout
    (see the module docstring): one copy of the weights, the packed speed at every size, and the
    promise Inductor's freezing asks for: the weights no longer change (``unfreeze`` undoes it).

    Args:
        model: the module whose linears to freeze, in place.
        layout: ``"auto"`` (timed per weight shape) or ``(r, pairs)``: vectors per block and
            whether bf16 is packed in pairs of k.

    Returns:
        A ``FreezeReport``.

    Raises:
        RuntimeError: the CPU kernel cannot be built on this machine.
        ValueError: a ``layout`` this CPU's kernel was not built with.

    Example::

        ft.freeze(model)
        compiled = torch.compile(model, backend="flashtune", dynamic=True)
    """
    start = time.perf_counter()
    kernel = blocked_gemm_or_none()
    if kernel is None:
        raise RuntimeError("flashtune.freeze: the CPU kernel is not available on this machine (see the log)")
    if layout != "auto":
        r, p = (int(v) for v in layout)
        if r not in {width for _, width in kernel.tiles} or p not in (0, 1) or (p and not kernel.bf16_pairs):
            raise ValueError(f"flashtune.freeze: layout {tuple(layout)!r} is not one this CPU's kernel was built with")
    report = FreezeReport()
    owners = _owners(model)
    originals: list[tuple[weakref.ref, int]] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, FrozenLinear):
            continue
        why = _why_kept(name, module, owners)
        if why is not None:
            report.kept.append((name, why))
            continue
        w = module.weight
        key = (tuple(w.shape), str(w.dtype).removeprefix("torch."))
        if key not in report.layouts:
            report.layouts[key] = _layout(kernel, w.detach()) if layout == "auto" else (r, p)
        r_, p_ = report.layouts[key]
        if w.dtype != torch.bfloat16:
            p_ = 0  # pairs pack bf16 only
        with torch.no_grad():
            packed = kernel.pack(w.detach(), r_, bool(p_))
        originals.append((weakref.ref(w), w.numel() * w.element_size()))
        requires_grad = w.requires_grad
        del module._parameters["weight"]
        module.__class__ = FrozenLinear
        module.register_buffer("packed", packed, persistent=False)
        module.pairs = p_
        module.frozen_requires_grad = requires_grad
        dtype = str(packed.dtype).removeprefix("torch.")
        module.site = _site(module.in_features, tuple(packed.shape), dtype, module.bias is not None)
        report.frozen += 1
        report.packed_bytes += packed.numel() * packed.element_size()
        del w
    del owners
    gc.collect()
    report.freed_bytes = sum(size for ref, size in originals if ref() is None)
    report.seconds = time.perf_counter() - start
    if report.frozen:
        log.info("flashtune: %s", str(report).replace("\n", "\nflashtune: "))
    if report.freed_bytes < sum(size for _, size in originals):
        log.warning(
            "flashtune.freeze: %.2f GB of frozen weights are still referenced outside the model (an optimizer, a "
            "variable), so their memory was not freed",
            (sum(size for _, size in originals) - report.freed_bytes) / 1e9,
        )
    return report


def unfreeze(model: nn.Module) -> int:
    """Undo ``freeze``: every ``FrozenLinear`` of ``model`` becomes an ``nn.Linear`` again, its weight
    a parameter with the values it had.

    Args:
        model: a module ``freeze`` froze (modules it did not freeze are left alone).

    Returns:
        How many linears were unfrozen.

    Raises:
        Nothing.

    Example::

        ft.unfreeze(model)  # the weights are parameters again, ready for training
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, FrozenLinear):
            continue
        w = module.unpacked_weight()
        requires_grad = module.frozen_requires_grad
        del module._buffers["packed"]
        for attr in ("pairs", "site", "frozen_requires_grad"):
            module.__dict__.pop(attr, None)
        module.__class__ = nn.Linear
        module.weight = nn.Parameter(w, requires_grad=requires_grad)
        count += 1
    return count
