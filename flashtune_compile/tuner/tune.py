"""Profiling one bucket: synthesize its inputs, check every candidate, time the correct ones, pick.

``tune_bucket`` guarantees: the default (``runners[0]``, tactic -1) runs first and its result is the
reference; each runner builds all its tactics at once first (``TunableRunner.precompile``); a
candidate that raises, or whose output is not the same function as the reference's
(``check.mismatch``), or that cannot run the way it is timed (captured in a CUDA graph, when the
deployment replays graphs), is never chosen, and its reason is kept; the default is replaced only
by a candidate that is *clearly* faster (``profiler.pick_winner``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cache import Entry
from .check import mismatch
from .keys import OpContext
from .profiler import ProfilerSettings, Timing, pick_winner, settle_cpu, time_candidates
from .runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner, canonical_tactic
from .synth import synthesize

log = logging.getLogger("flashtune")


@dataclass(frozen=True)
class Tuned:
    """What profiling one bucket found: the winner (runner index, tactic) and its cache entry."""

    runner: int
    tactic: Tactic
    entry: Entry
    synthesized: int  # tensors made for profiling
    timed: int  # candidates timed (0 when the default was the only correct one)


def _correct_candidates(
    ctx: OpContext, runners: Sequence[TunableRunner], synth: list, profile: BucketProfile
) -> tuple[list[tuple[int, Tactic]], list[str]]:
    """The (runner index, tactic) pairs whose output matches the default's, the default first, and
    a reason for each one rejected."""
    ref = runners[0].forward(synth, DEFAULT_TACTIC)  # the default must work: its error is the op's
    candidates: list[tuple[int, Tactic]] = [(0, DEFAULT_TACTIC)]
    rejected: list[str] = []
    for i, runner in enumerate(runners):
        try:
            tactics = [canonical_tactic(t) for t in runner.get_valid_tactics(synth, profile)]
        except Exception as e:
            rejected.append(f"{runner.name}: get_valid_tactics raised {type(e).__name__}: {e}")
            continue
        tactics = [t for t in dict.fromkeys(tactics) if (i, t) not in candidates]  # each once
        try:
            runner.precompile(synth, tactics)  # e.g. all Triton kernels at once, in parallel
        except Exception as e:  # only time is lost: each tactic still compiles on its first call
            log.warning(
                "flashtune: %s: precompiling %d tactic(s) failed: %s: %s",
                runner.name,
                len(tactics),
                type(e).__name__,
                e,
            )
        for t in tactics:
            try:
                why = mismatch(runner.forward(synth, t), ref, ctx.config.rtol)
            except Exception as e:
                why = f"raised {type(e).__name__}: {e}"
            if why is None:
                candidates.append((i, t))
            else:
                rejected.append(f"{runner.name}[{t!r}]: {why}")
    return candidates, rejected


def tune_bucket(
    ctx: OpContext,
    runners: Sequence[TunableRunner],
    inputs: Sequence[Any],
    bucket: tuple[int, ...],
    settings: ProfilerSettings,
    min_gain: float,
    generator: Callable[[torch.device], torch.Generator],
) -> Tuned:
    """Profile every valid (runner, tactic) of ``bucket`` on inputs synthesized from ``inputs``
    (random values from ``generator(device)``) and return the winner."""
    synth, shapes, made = synthesize(inputs, ctx.config, bucket, generator)
    candidates, rejected = _correct_candidates(ctx, runners, synth, BucketProfile(bucket, shapes))
    if rejected:
        log.info("flashtune: %s bucket %s: never choosing %s", ctx.op, bucket, "; ".join(rejected))
    if len(candidates) == 1:  # nothing to choose between: record the default untimed
        times = [Timing(0.0, 0.0, 0.0)]
    else:
        fns: list[Callable[[], Any]] = [lambda r=runners[i], t=t: r.forward(synth, t) for i, t in candidates]
        device = next((x.device for x in synth if isinstance(x, torch.Tensor)), torch.device("cpu"))
        timed = time_candidates(fns, device, settings)
        for (i, t), tm in zip(candidates, timed):
            if tm is None:
                rejected.append(f"{runners[i].name}[{t!r}]: cannot be captured in a CUDA graph")
        kept = [n for n, tm in enumerate(timed) if tm is not None]  # the default (0) always is
        candidates, times = [candidates[n] for n in kept], [timed[n] for n in kept]
        if device.type == "cpu":  # a candidate ahead of the default but within the noise: measure more
            times = settle_cpu([fns[n] for n in kept], times, min_gain, settings)
        if log.isEnabledFor(logging.DEBUG):
            medians = (f"{runners[i].name}[{t!r}] {tm.median * 1e6:.1f}us" for (i, t), tm in zip(candidates, times))
            log.debug("flashtune: %s bucket %s medians: %s", ctx.op, bucket, ", ".join(medians))
    best = pick_winner(times, min_gain)
    idx, tactic = candidates[best]
    entry = Entry(runners[idx].name, tactic, times[best].median, times[0].median, timed=len(times), rejected=rejected)
    return Tuned(idx, tactic, entry, made, len(times) if len(times) > 1 else 0)
