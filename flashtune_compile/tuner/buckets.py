"""Bucket ladders and tuning specs: which sizes get their own tactic, and how a size maps to one.

A runtime size always maps *up* to the smallest bucket that is at least as large, and the bucket is
profiled at that upper end. A tactic that was valid and correct at the bucket's size is therefore
run only on sizes it has already covered (kernels mask their edges), never on a larger one. Sizes
above the ladder's top keep their own power-of-two buckets, so nothing is ever mapped down.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LadderSpec = str | Sequence[int]
LADDERS = ("pow2", "hybrid")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def pow2_ladder(max_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including the first power of two >= max_size."""
    return tuple(1 << i for i in range(next_pow2(max(1, max_size)).bit_length()))


def hybrid_ladder(max_size: int) -> tuple[int, ...]:
    """Powers of two to 256, steps of 256 to 2048, of 512 to 4096, then powers of two.

    Ends at the first bucket >= max_size. Example: hybrid_ladder(3000)[-4:] == (2048, 2560, 3072).
    """
    out: list[int] = []
    n = 1
    while True:
        out.append(n)
        if n >= max_size:
            return tuple(out)
        n = n * 2 if n < 256 else n + 256 if n < 2048 else n + 512 if n < 4096 else n * 2


def make_ladder(spec: LadderSpec, max_size: int, min_size: int = 1) -> tuple[int, ...]:
    """The sorted bucket sizes for a ladder spec ("pow2", "hybrid" or explicit ints), clipped so
    that the first bucket is the smallest one >= min_size and the last the first one >= max_size."""
    if isinstance(spec, str):
        if spec == "pow2":
            full = pow2_ladder(max_size)
        elif spec == "hybrid":
            full = hybrid_ladder(max_size)
        else:
            raise ValueError(f"unknown bucket ladder {spec!r}; valid: {LADDERS} or a sorted list of ints")
    else:
        full = tuple(int(s) for s in spec)
        if not full or any(s < 1 for s in full) or list(full) != sorted(set(full)):
            raise ValueError(f"an explicit bucket ladder must be strictly increasing positive ints, got {spec!r}")
    lo = bisect.bisect_left(full, min_size)
    hi = bisect.bisect_left(full, max_size)
    return full[min(lo, len(full) - 1) : hi + 1] or full[-1:]


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic axis of an op: dim ``dim_idx[i]`` of input ``input_idx[i]``, for every i, share
    its size, and a runtime size maps up to the smallest bucket at least as large.

    Args:
        input_idx: the input (or inputs) that have the axis.
        dim_idx: the axis's dim in each of them (one for all, or one per input).
        buckets: the ladder: "pow2", "hybrid" (powers of two to 256, then steps of 256 to 2048,
            of 512 to 4096, then powers of two) or an explicit strictly increasing list of ints.
        max_size: the top of a generated ladder.
        min_size: its bottom (e.g. from a symbol's value range).

    Raises:
        ValueError: ``dim_idx`` matches neither one nor every input, ``min_size`` / ``max_size``
            out of order, or an unknown ladder.

    Example: the token-count axis of a linear's input::

        ft.DynamicDim(input_idx=0, dim_idx=0, buckets="hybrid")
    """

    input_idx: tuple[int, ...] | int
    dim_idx: tuple[int, ...] | int
    buckets: LadderSpec = "hybrid"
    max_size: int = 8192
    min_size: int = 1
    ladder: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ins = (self.input_idx,) if isinstance(self.input_idx, int) else tuple(self.input_idx)
        dims = (self.dim_idx,) if isinstance(self.dim_idx, int) else tuple(self.dim_idx)
        if not ins or len(dims) not in (1, len(ins)):
            raise ValueError(f"DynamicDim: dim_idx {dims} must have one entry or one per input {ins}")
        if len(dims) == 1:
            dims = dims * len(ins)
        if self.min_size < 0 or self.max_size < max(1, self.min_size):
            raise ValueError(f"DynamicDim: need 0 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        object.__setattr__(self, "input_idx", ins)
        object.__setattr__(self, "dim_idx", dims)
        buckets = self.buckets if isinstance(self.buckets, str) else tuple(self.buckets)
        object.__setattr__(self, "buckets", buckets)
        object.__setattr__(self, "ladder", make_ladder(buckets, self.max_size, max(1, self.min_size)))

    def bucket(self, size: int) -> int:
        """The bucket of a runtime size: the smallest ladder entry >= size; above the top, the next
        power of two (>= size, so still an upper end). Size 0 is its own bucket, 0."""
        ladder = self.ladder
        if size <= ladder[-1]:
            return ladder[bisect.bisect_left(ladder, size)] if size > 0 else 0
        return next_pow2(size)


@dataclass(frozen=True)
class ConstraintSpec:
    """A dim derived from the others when inputs are synthesized for a bucket; the cache key
    treats the dim as dynamic.

    Args:
        input_idx: the input whose dim is derived.
        dim_idx: which of its dims.
        infer: ``infer(shapes) -> int``, where ``shapes`` lists every input's synthesized shape
            (None for non-tensors).

    Raises:
        Nothing here; an ``infer`` that raises fails that bucket's tuning.

    Example: per-expert offsets as long as the expert weights' first dim::

        ft.ConstraintSpec(input_idx=1, dim_idx=0, infer=lambda shapes: shapes[2][0])
    """

    input_idx: int
    dim_idx: int
    infer: Callable[[list], int]


Initializer = Callable[[tuple, Any, Any], Any]  # (shape, dtype, device) -> Tensor


@dataclass(frozen=True, eq=False)
class TuningConfig:
    """How an op is tuned: its dynamic axes, derived dims, input initializers and tolerance.

    Args:
        dynamic: the op's ``DynamicDim`` axes (a call's bucket is one size per axis).
        constraints: ``ConstraintSpec`` dims derived from the others.
        initializers: input index -> ``fn(shape, dtype, device) -> Tensor``, used when that input
            is synthesized for profiling (e.g. ids within their valid range).
        rtol: overrides the dtype's tolerance when candidates are checked against the default.
        weights_change: the weights are updated between calls (a training graph, where the
            optimizer steps them), so a tactic reading a weight copy is timed with the copy made
            again on every call, and at run time a stale copy is made again at once; such buckets
            have cache keys of their own.

    Raises:
        TypeError: an entry of ``dynamic`` is not a ``DynamicDim``.
        ValueError: one (input, dim) pair in two axes.

    Example::

        config = ft.TuningConfig(dynamic=[ft.DynamicDim(input_idx=0, dim_idx=0, buckets="hybrid")])
        runner, tactic = ft.AutoTuner.get().choose_one("my_mm", runners, config, (x, w))
    """

    dynamic: tuple[DynamicDim, ...] = ()
    constraints: tuple[ConstraintSpec, ...] = ()
    initializers: Mapping[int, Initializer] = field(default_factory=dict)
    rtol: float | None = None
    weights_change: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dynamic", tuple(self.dynamic))
        object.__setattr__(self, "constraints", tuple(self.constraints))
        object.__setattr__(self, "initializers", dict(self.initializers))
        seen: set[tuple[int, int]] = set()
        for spec in self.dynamic:
            if not isinstance(spec, DynamicDim):
                raise TypeError(f"TuningConfig.dynamic takes DynamicDim specs, got {spec!r}")
            for pair in zip(spec.input_idx, spec.dim_idx):
                if pair in seen:
                    raise ValueError(f"TuningConfig: input {pair[0]} dim {pair[1]} is in two DynamicDims")
                seen.add(pair)

    def bucket_of(self, inputs: Sequence[Any]) -> tuple[int, ...]:
        """The bucket of each dynamic axis for these inputs; ValueError if inputs sharing an axis
        disagree on its size."""
        out = []
        for spec in self.dynamic:
            sizes = {inputs[i].shape[d] for i, d in zip(spec.input_idx, spec.dim_idx)}
            if len(sizes) != 1:
                raise ValueError(f"inputs {spec.input_idx} share a dynamic axis but have sizes {sorted(sizes)}")
            out.append(spec.bucket(sizes.pop()))
        return tuple(out)

    def varying_dims(self) -> dict[int, set[int]]:
        """Input index -> dims that are dynamic or derived (left out of the static key)."""
        out: dict[int, set[int]] = {}
        for spec in self.dynamic:
            for i, d in zip(spec.input_idx, spec.dim_idx):
                out.setdefault(i, set()).add(d)
        for c in self.constraints:
            out.setdefault(c.input_idx, set()).add(c.dim_idx)
        return out
