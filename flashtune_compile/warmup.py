"""Graph-level tuning at warmup: run a compiled model once per token count, tuning as it goes.

Each call reaches every routed op of the graph with that token count, so every op's bucket for it
is tuned (once: a bucket already in the cache is a hit). A progress bar shows the current token
count and bucket, the ops tuned so far, elapsed time and ETA, and which op is being tuned right now;
a summary table closes it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .backend import Options, parse_options
from .kernels import builds
from .tuner import distributed as teams
from .tuner.autotuner import AutoTuner, autotune
from .tuner.buckets import DynamicDim

log = logging.getLogger("flashtune")


@dataclass(frozen=True)
class WarmupStep:
    """What one warmup call did."""

    num_tokens: int
    bucket: int  # the ladder bucket the token count maps to
    seconds: float  # wall time of the call, compiling and tuning included
    tuned: int  # buckets profiled (one per op shape that had not seen this bucket)
    timings: int  # candidate timings run
    hits: int  # tactic-cache hits
    compiles: int  # graphs the flashtune backend compiled during the call


@dataclass
class WarmupReport:
    """``ft.warmup``'s result; prints as a table (rich or plain).

    Args:
        steps: one step per token count this rank ran: the count, its bucket, seconds, buckets
            tuned, timings and cache hits.
        seconds: the whole warmup's time.
        merged: winners received from other ranks (a data-parallel warmup).

    Raises:
        Nothing (a dataclass).

    Example::

        report = ft.warmup(compiled, make_inputs)
        print(report)  # the table
    """

    steps: list[WarmupStep] = field(default_factory=list)
    seconds: float = 0.0
    merged: int = 0

    @property
    def tuned(self) -> int:
        return sum(s.tuned for s in self.steps)

    @property
    def timings(self) -> int:
        return sum(s.timings for s in self.steps)

    @property
    def compiles(self) -> int:
        return sum(s.compiles for s in self.steps)

    def table(self) -> Table:
        t = Table(
            title=f"flashtune warmup: {len(self.steps)} token counts, {self.tuned} buckets tuned, "
            f"{self.timings} timings, {self.seconds:.1f}s",
            show_footer=True,
        )
        cols = [
            ("tokens", "total"),
            ("bucket", ""),
            ("seconds", f"{self.seconds:.2f}"),
            ("buckets tuned", str(self.tuned)),
            ("timings", str(self.timings)),
            ("cache hits", str(sum(s.hits for s in self.steps))),
            ("graphs compiled", str(self.compiles)),
        ]
        for name, footer in cols:
            t.add_column(name, footer=footer, justify="right")
        for s in self.steps:
            t.add_row(
                str(s.num_tokens),
                str(s.bucket),
                f"{s.seconds:.2f}",
                str(s.tuned),
                str(s.timings),
                str(s.hits),
                str(s.compiles),
            )
        return t

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        out = io.StringIO()
        Console(file=out, width=100, color_system=None).print(self.table())
        return out.getvalue()


_WRAPPER_ATTRS = ("callback", "_torchdynamo_orig_backend", "_inner_convert")


def backend_options(compiled: Any) -> Options | None:
    """The options given to ``torch.compile(..., backend="flashtune", options=...)`` for
    ``compiled``, found by walking Dynamo's wrappers; None when they cannot be found (a compiled
    plain function, a backend passed as a callable, another torch version's wrapper layout)."""
    todo, seen = [compiled], set()
    while todo and len(seen) < 64:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        kwargs = getattr(obj, "kwargs", None)
        if getattr(obj, "compiler_name", None) == "flashtune" and isinstance(kwargs, dict):
            try:
                return parse_options(kwargs.get("options"))
            except ValueError:
                return None
        # torch 2.7-2.13: OptimizedModule.dynamo_ctx.callback, then _torchdynamo_orig_backend (twice)
        # reach torch's wrapper holding compiler_name and kwargs["options"]. A module forwards
        # unknown attribute names to the model it wraps, so from a module only dynamo_ctx is read.
        attrs = ("dynamo_ctx",) if isinstance(obj, torch.nn.Module) else _WRAPPER_ATTRS
        todo.extend(nxt for nxt in (getattr(obj, a, None) for a in attrs) if nxt is not None)
    return None


def token_axis(compiled: Any, max_tokens: int | None = None, buckets: Any = None) -> DynamicDim:
    """The token-count axis ``compiled`` tunes on: its ladder is every bucket up to ``max_tokens``.
    Unset arguments come from the options ``compiled`` was compiled with, else the backend's
    defaults (hybrid ladder up to 8192)."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"ft.warmup: max_tokens must be a positive int, got {max_tokens!r}")
    opts = backend_options(compiled) or Options()
    return DynamicDim(
        0,
        0,
        buckets=buckets if buckets is not None else opts.buckets,
        max_size=max_tokens if max_tokens is not None else opts.max_tokens,
    )


def _call(compiled: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return compiled(**inputs)
    if isinstance(inputs, (tuple, list)):
        return compiled(*inputs)
    return compiled(inputs)


def _check_sizes(num_tokens: Iterable[int]) -> list[int]:
    """The distinct token counts, ascending; ValueError unless they are positive ints."""
    try:
        given = list(num_tokens)
        sizes = [operator.index(n) for n in given if not isinstance(n, bool)]
    except TypeError:
        raise ValueError(f"ft.warmup: num_tokens must be a list of positive ints, got {num_tokens!r}") from None
    if not given or len(sizes) != len(given) or min(sizes) < 1:
        raise ValueError(f"ft.warmup: num_tokens must be a non-empty list of positive ints, got {given!r}")
    return sorted(set(sizes))


def warmup(
    compiled: Callable[..., Any],
    make_inputs: Callable[[int], Any],
    num_tokens: Iterable[int] | None = None,
    *,
    max_tokens: int | None = None,
    buckets: Any = None,
    grad: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
    prepare: bool = True,
) -> WarmupReport:
    """Call ``compiled(*make_inputs(n))`` once per token count ``n``, tuning every unseen bucket.

    ``make_inputs(n)`` returns the call's positional args (a tuple; a dict is passed as keyword
    args, anything else as the one argument). ``num_tokens`` defaults to every bucket of the ladder
    up to ``max_tokens`` (see ``token_axis``). Tuning is on during the calls even where the
    tune mode is "off"; calls run under ``torch.no_grad()`` unless ``grad``. Each bucket is tuned at
    most once, so a second warmup profiles nothing; winners are written to the tactic cache as
    they are found, so an interrupted warmup keeps what it tuned. ``progress``: show the bar and
    the closing table (on stderr). ``prepare``: first build the compiled kernel families the model
    may use (``ft.prepare``), so the first call's time is tuning, not a compiler's.

    ``distributed`` (with ``torch.distributed`` initialized over several ranks): True splits the
    token counts across the ranks (rank r of n runs every n-th count, tuning alone), then gives
    every rank every rank's winners: for data-parallel replicas, each tunes about 1/n of the
    buckets. False: this rank alone, no coordination. None (the default): True under the
    "replicas" strategy (``$FLASHTUNE_DISTRIBUTED``), else every rank runs every count and the
    ranks settle each bucket together as they reach it (lockstep).

    Args:
        compiled: a model compiled with ``backend="flashtune"``.
        make_inputs: ``make_inputs(n)`` -> the call's arguments for ``n`` tokens.
        num_tokens: the token counts to run (default: every bucket up to ``max_tokens``).
        max_tokens: the top of the default ladder (default: the compiled options', else 8192).
        buckets: the ladder (default: the compiled options').
        grad: run the calls with gradients enabled.
        progress: show the bar and the closing table.
        distributed: see above.
        prepare: build the compiled kernel families first.

    Returns:
        A ``WarmupReport``.

    Raises:
        ValueError: ``num_tokens`` or ``max_tokens`` that are not positive ints.
        DistributedTuningError: the ranks could not settle a bucket together.
        Whatever the model raises on the inputs.

    Example::

        compiled = torch.compile(model, backend="flashtune", dynamic=True)
        ft.warmup(compiled, lambda n: (torch.randint(0, vocab, (1, n)),), max_tokens=512)
    """
    axis = token_axis(compiled, max_tokens, buckets)
    sizes = _check_sizes(num_tokens) if num_tokens is not None else list(axis.ladder)
    if prepare:
        options = backend_options(compiled)
        builds.prepare(options.kernels if options is not None else None)
    if distributed is False:
        with teams.strategy("off"):
            return warmup(
                compiled,
                make_inputs,
                sizes,
                max_tokens=max_tokens,
                buckets=buckets,
                grad=grad,
                progress=progress,
                prepare=False,
            )
    team = teams.team()
    if team is not None and (distributed or teams.resolve() == "replicas"):
        return _replicas_warmup(team, compiled, make_inputs, sizes, max_tokens, buckets, grad, progress)
    tuner = AutoTuner.get()
    stats = tuner.stats
    report = WarmupReport()
    bar = tqdm(total=len(sizes), desc="flashtune warmup", unit="size", disable=not progress, dynamic_ncols=True)
    done, now = 0, ""  # buckets tuned so far; the op being tuned, or the last one tuned

    def show(n: int) -> None:
        bar.set_postfix_str(f"tokens={n} bucket={axis.bucket(n)} tuned={done}{now}", refresh=True)

    def on_tune(op: str, bucket: tuple, entry: Any) -> None:
        nonlocal done, now
        where = f"{op} {list(bucket) or 'static'}"
        done += entry is not None
        now = f" | tuning {where}" if entry is None else f" | {where}: {entry.runner} {entry.speedup:.2f}x"
        show(current)

    start = time.perf_counter()
    tuner.listeners.append(on_tune)
    grad_mode = contextlib.nullcontext() if grad else torch.no_grad()
    try:
        # Log lines go above the bar instead of through it (only where flashtune's logger prints itself).
        redirect = logging_redirect_tqdm(loggers=[log]) if log.handlers else contextlib.nullcontext()
        with redirect, autotune(True), grad_mode:
            for current in sizes:
                show(current)
                before = (stats.misses - stats.fallbacks, stats.profiles, stats.hits, stats.compiles)
                t0 = time.perf_counter()
                _call(compiled, make_inputs(current))
                seconds = time.perf_counter() - t0
                after = (stats.misses - stats.fallbacks, stats.profiles, stats.hits, stats.compiles)
                delta = [a - b for a, b in zip(after, before)]
                report.steps.append(WarmupStep(current, axis.bucket(current), seconds, *delta))
                bar.update(1)
    finally:
        tuner.listeners.remove(on_tune)
        report.seconds = time.perf_counter() - start
        bar.close()
    _closing(report, progress, len(sizes), stats.routed_ops)
    return report


def _closing(report: WarmupReport, progress: bool, counts: int, routed_ops: int) -> None:
    if routed_ops == 0:
        log.warning("flashtune: warmup ran no flashtune op; was the model compiled with backend='flashtune'?")
    if progress:
        Console(stderr=True).print(report.table())
    log.info(
        "flashtune: warmup of %d token counts took %.1fs: %d buckets tuned, %d timings",
        counts,
        report.seconds,
        report.tuned,
        report.timings,
    )


def _replicas_warmup(
    team: teams.Team,
    compiled: Callable[..., Any],
    make_inputs: Callable[[int], Any],
    sizes: list[int],
    max_tokens: int | None,
    buckets: Any,
    grad: bool,
    progress: bool,
) -> WarmupReport:
    """This rank's share of ``sizes``, tuned alone; then every rank's new winners into every rank's caches."""
    tuner = AutoTuner.get()
    before = {id(cache): cache.snapshot() for cache in tuner.caches.values()}
    mine = [sizes[i] for i in team.share(len(sizes))]
    start = time.perf_counter()
    report = WarmupReport()
    if mine:
        with teams.strategy("off"):
            report = warmup(
                compiled, make_inputs, mine, max_tokens=max_tokens, buckets=buckets, grad=grad, progress=progress
            )
    found = []
    for cache in tuner.caches.values():
        old = before.get(id(cache), {})
        new = {key: e for key, e in cache.snapshot().items() if old.get(key) != e}
        if new:
            label = None if cache is tuner.cache else str(cache.directory)
            found.append((label, cache.env.get("timing", ""), new))
    received = 0
    for r, entries in enumerate(team.gather("merging the warmup's winners", found)):
        if r == team.rank:
            continue
        for label, timing, new in entries:
            cuda_graph = timing.endswith("+cuda_graph")
            cache = tuner.cache if label is None and not cuda_graph else tuner.cache_for(label, cuda_graph)
            received += cache.merge_in(new)
    report.merged = received
    report.seconds = time.perf_counter() - start
    log.info(
        "flashtune: rank %d of %d warmed %d of %d token counts and took %d winners from the others",
        team.rank,
        team.size,
        len(mine),
        len(sizes),
        received,
    )
    return report
