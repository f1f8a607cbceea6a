"""The interface every candidate implements, and what a tactic may be.

A tactic is a plain JSON value (an int, a string, or a tuple of those, floats and bools), so that
it can be persisted and read back without executing anything. Tactic ``-1`` on the first runner
of a candidate list is the default: always valid, never profiled away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Tactic = int | str | tuple
DEFAULT_TACTIC = -1


@dataclass(frozen=True)
class BucketProfile:
    """The bucket being tuned, as ``TunableRunner.get_valid_tactics`` sees it.

    Args:
        bucket: one size per dynamic axis of the op's ``TuningConfig`` (the bucket's upper end).
        shapes: every input's shape at that size (None for an input that is not a tensor).

    Raises:
        Nothing (a frozen dataclass).

    Example::

        def get_valid_tactics(self, inputs, profile):
            m = profile.bucket[0]  # or profile.shapes[0][0]
            return [t for t in (16, 64, 256) if t <= m]
    """

    bucket: tuple[int, ...]
    shapes: tuple[Any, ...]


class TunableRunner:
    """One candidate implementation of an op, with a space of tactics.

    Subclasses set a stable ``name`` (it is persisted) and implement ``forward``. They must be
    functional: ``forward`` must not modify its inputs. ``cache_key_extras`` must depend only on
    input metadata and scalars (dtype, layout, flags), never on data, so that real and synthesized
    inputs give the same answer. Takes no constructor arguments of its own.

    Raises:
        NotImplementedError: ``forward`` of a subclass that does not define it. An exception a
            subclass raises while tuning only rules that tactic out (the reason is kept in
            ``ft.tactics()``); at run time it propagates.

    Example::

        class Chunked(ft.TunableRunner):
            name = "mm_chunked"

            def get_valid_tactics(self, inputs, profile):
                return [t for t in (16, 64, 256) if t <= profile.bucket[0]]

            def forward(self, inputs, tactic=-1):
                x, w = inputs
                return torch.cat([x[i : i + tactic] @ w for i in range(0, len(x), tactic)])
    """

    name: str = ""

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> Sequence[Tactic]:
        """Tactics worth timing for this bucket; [] means the runner does not apply.

        Decide from ``profile`` (the bucket and every input's shape at it), not from the inputs'
        own dynamic sizes: a cached tactic is re-checked with this call on the real inputs."""
        return [DEFAULT_TACTIC]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def unpacked(self, tactic: Tactic) -> Callable[..., Any] | None:
        """Optional: a function ``fn`` with ``fn(*inputs) == forward(inputs, tactic)`` that costs no
        Python frame of its own (an ATen function, say), which a warm call then calls directly.
        None (the default): the warm call goes through ``forward``."""
        return None

    def precompile(self, inputs: Sequence[Any], tactics: Sequence[Tactic]) -> None:
        """Build whatever ``forward(inputs, t)`` for each of ``tactics`` would build on first call
        (e.g. Triton kernels, all at once in parallel), so that tuning a bucket costs about one
        compile plus the timings. Optional: a failure here only costs time, ``forward`` still runs."""

    def cache_key_extras(self, inputs: Sequence[Any]) -> tuple:
        """Extra JSON-able values that select a different cache entry (default: none)."""
        return ()

    def copy_kind(self, tactic: Tactic) -> str | None:
        """The kind of weight copy ``tactic`` reads from the tuner's weight cache (``tuner/weights.py``),
        None if it needs none (the default). Such a tactic's ``forward`` admits the copies it needs
        (``weights.admitting``) and raises ``CopyDenied`` when one is refused; its ``unpacked``
        function, the warm path, raises ``CopyMissing`` / ``CopyDenied`` as ``WeightCache.get`` does,
        and the site admits the copy at the bucket's gain or runs a tactic that needs none."""
        return None

    @classmethod
    def for_op(cls, op: Any) -> TunableRunner:
        """This runner as a candidate of ``op`` (an ``ops.spec.OpSpec``); the default takes no
        arguments. Generic runners read what they need from the op, e.g. its GEMM view."""
        return cls()

    def __call__(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> Any:
        return self.forward(inputs, tactic)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_SCALARS = (int, str, float, bool)


def canonical_tactic(value: Any) -> Tactic:
    """The canonical (hashable) form of a tactic: lists become tuples. TypeError if ``value`` is
    not an int, str, float, bool or a (nested) list/tuple of those."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(canonical_tactic(v) for v in value)
    raise TypeError(f"a tactic must be an int, str or tuple of them, got {type(value).__name__}: {value!r}")


class DefaultOnly(TunableRunner):
    """``runner``'s default tactic alone, under its own name (``<name>_default``) so that cache
    entries chosen among its tactics and entries of the default alone never mix."""

    def __init__(self, runner: TunableRunner) -> None:
        self.runner = runner
        self.name = f"{runner.name}_default"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> Sequence[Tactic]:
        return [DEFAULT_TACTIC]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> Any:
        return self.runner.forward(inputs, DEFAULT_TACTIC)

    def unpacked(self, tactic: Tactic) -> Callable[..., Any] | None:
        return self.runner.unpacked(DEFAULT_TACTIC)

    def copy_kind(self, tactic: Tactic) -> str | None:
        return self.runner.copy_kind(DEFAULT_TACTIC)
