"""What identifies a call: its signature (memo key) and its bucket's tactic-cache key.

A *signature* is everything a choice can depend on (each tensor's shape, stride, dtype and
device, and every scalar's value); equal signatures get the same answer, so the tuner memoizes
choices by it. A *cache key* is what the on-disk tactic cache is keyed by: the op, its runner
names, the static part of every input (dynamic dims as -1), the runners' extras (and a mark for a
training graph's buckets, ``TuningConfig.weights_change``) and the bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .buckets import TuningConfig
from .cache import Key, freeze
from .runner import Tactic, TunableRunner

MEMO_LIMIT = 8192  # a memo past this many entries starts over (callers with unbounded sizes)


def signature(inputs: Sequence[Any], Tensor: type = torch.Tensor) -> tuple:
    """Everything a cache key can depend on: each tensor's shape, stride, dtype and device, and
    the value of each scalar."""
    sig = []
    for x in inputs:
        if isinstance(x, Tensor):
            sig.append((x.shape, x.stride(), x.dtype, x.device))
        elif x is None or isinstance(x, (int, float, str, bool)):
            sig.append(x)
        else:
            sig.append(freeze(x) if isinstance(x, (list, tuple)) else type(x).__name__)
    return tuple(sig)


def bounded_put(memo: dict | set, key: Any, value: Any = None) -> None:
    """``memo[key] = value`` (or ``memo.add(key)`` for a set), clearing it first when full."""
    if len(memo) >= MEMO_LIMIT:
        memo.clear()
    if isinstance(memo, set):
        memo.add(key)
    else:
        memo[key] = value


class OpContext:
    """What is fixed for one (op, runner names, config): how cache keys are made."""

    def __init__(self, op: str, runners: Sequence[TunableRunner], config: TuningConfig) -> None:
        if not runners:
            raise ValueError(f"choose_one({op!r}): needs at least one runner (the first is the default)")
        names = tuple(r.name for r in runners)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"choose_one({op!r}): runner names must be distinct non-empty strings, got {names}")
        self.op, self.runners, self.config, self.names = op, runners, config, names
        self.varying = {i: set(ds) for i, ds in config.varying_dims().items()}

    def cache_key(self, inputs: Sequence[Any], bucket: tuple[int, ...]) -> Key:
        static = []
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                dyn = {d % x.dim() for d in self.varying.get(i, ())}
                shape = tuple(-1 if d in dyn else s for d, s in enumerate(x.shape))
                static.append(("T", shape, str(x.dtype).removeprefix("torch."), x.device.type))
            elif x is None or isinstance(x, (int, float, str, bool)):
                static.append(x)
            else:
                static.append(freeze(x) if isinstance(x, (list, tuple)) else type(x).__name__)
        extras = []
        for r in self.runners:
            try:
                extras.append(freeze(r.cache_key_extras(inputs)))
            except TypeError as e:
                raise TypeError(f"{r!r}.cache_key_extras must return JSON values: {e}") from None
        if self.config.weights_change:  # training: copies are timed re-made, so winners differ
            extras.append("weights change")
        return (self.op, self.names, tuple(static), tuple(extras), bucket)


class Alias:
    """One caller's (runners, config, cache) objects: holds them alive (so their ids stay unique
    while they key the alias map) and memoizes signature -> (runner, tactic) for cache hits, and
    the signatures known to miss while tuning is off."""

    __slots__ = ("ctx", "runners", "config", "cache", "memo", "missed")

    def __init__(self, ctx: OpContext, runners: Sequence[TunableRunner], config: TuningConfig, cache: Any) -> None:
        self.ctx, self.runners, self.config, self.cache = ctx, runners, config, cache
        self.memo: dict[tuple, tuple[TunableRunner, Tactic]] = {}
        self.missed: set[tuple] = set()
