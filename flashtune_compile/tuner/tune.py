"""Profiling one bucket: synthesize its inputs, check every candidate, time the correct ones, pick.

``tune_bucket`` guarantees: the default (``runners[0]``, tactic -1) runs before any candidate and its
result is the reference; each runner builds all its tactics at once first (``TunableRunner.precompile``); a
candidate that raises, or whose output is not the same function as the reference's
(``check.mismatch``), or that cannot run the way it is timed (captured in a CUDA graph, when the
deployment replays graphs), or whose weight copy does not fit the weight cache's budget, or reads a
copy of another kind than the one this shape's weights already hold (``layout``), is never chosen,
and its reason is kept; the default is replaced only by a candidate that is *clearly* faster
(``profiler.pick_winner``). Where the weights change between calls (``TuningConfig.weights_change``:
a training graph), a candidate reading a weight copy is timed making it again on every call, so it
wins only if it wins with the re-pack. A candidate that reads a weight copy wins only if it is also faster than
the best candidate without one by ``copy_min_gain`` (20%): a copy costs the weight's memory again,
so a few percent do not pay for it. The entry also names the fastest candidate that needs no weight
copy (the fallback where a copy is refused later); the copies the candidates made are dropped
when tuning ends (``WeightCache.trial``). With a lockstep team of ranks
(``tuner/distributed.py``), the listed candidates are dealt out round-robin: each rank checks and
times only its share (rank 0's includes the default), and every rank picks from everyone's timings
with the same rule, so all get the same winner.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .cache import Entry
from .check import mismatch
from .keys import OpContext
from .profiler import ProfilerSettings, Timing, pick_winner, settle_cpu, time_candidates
from .runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner, canonical_tactic
from .synth import synthesize
from .weights import CopyPostponed, WeightCache

if TYPE_CHECKING:
    from .distributed import Team

log = logging.getLogger("flashtune")


@dataclass(frozen=True)
class Tuned:
    """What profiling one bucket found: the winner (runner index, tactic) and its cache entry."""

    runner: int
    tactic: Tactic
    entry: Entry
    synthesized: int  # tensors made for profiling
    timed: int  # candidates timed here (0 when the default was the only correct one)


def _listed_candidates(
    runners: Sequence[TunableRunner], synth: list, profile: BucketProfile, layout: str | None = None
) -> tuple[list[tuple[int, Tactic]], list[str]]:
    """Every (runner index, tactic) offered for this bucket, the default first and each once, less
    those reading a weight copy of another kind than ``layout`` (when given); and a reason for each
    runner that could not even list its tactics or was left out so. The same on every rank of a
    job (it depends on the bucket's shapes only)."""
    listed: list[tuple[int, Tactic]] = [(0, DEFAULT_TACTIC)]
    rejected: list[str] = []
    for i, runner in enumerate(runners):
        try:
            tactics = [canonical_tactic(t) for t in runner.get_valid_tactics(synth, profile)]
        except Exception as e:
            rejected.append(f"{runner.name}: get_valid_tactics raised {type(e).__name__}: {e}")
            continue
        if layout is not None:
            other = [t for t in tactics if runner.copy_kind(t) not in (None, layout)]
            if other:
                rejected.append(f"{runner.name}: {len(other)} tactic(s) read another copy than this shape's {layout}")
            tactics = [t for t in tactics if t not in other]
        listed += [(i, t) for t in dict.fromkeys(tactics) if (i, t) not in listed]
    return listed, rejected


def _checked(
    ctx: OpContext,
    runners: Sequence[TunableRunner],
    synth: list,
    ref: Any,
    candidates: list[tuple[int, Tactic]],
    copies: WeightCache | None = None,
) -> tuple[list[tuple[int, Tactic]], list[str], list[tuple[int, Tactic]]]:
    """Those of ``candidates`` whose output matches the default's ``ref`` (each runner builds its
    tactics all at once first), a reason for each one rejected, and those postponed: their weight
    copy fits only once the copies of the other candidates are dropped (``CopyPostponed``). One
    whose own copies do not fit together (postponed with no other candidate's copy held) is
    rejected, so a later round always makes progress."""
    correct: list[tuple[int, Tactic]] = []
    rejected: list[str] = []
    postponed: list[tuple[int, Tactic]] = []
    for i in dict.fromkeys(i for i, _ in candidates):
        runner, tactics = runners[i], [t for j, t in candidates if j == i]
        todo = [t for t in tactics if (i, t) != (0, DEFAULT_TACTIC)]
        try:
            runner.precompile(synth, todo)
        except Exception as e:  # only time is lost: each tactic still compiles on its first call
            log.warning(
                "flashtune: %s: precompiling %d tactic(s) failed: %s: %s", runner.name, len(todo), type(e).__name__, e
            )
        for t in tactics:
            if (i, t) == (0, DEFAULT_TACTIC):
                correct.append((i, t))
                continue
            alone = copies is None or copies.trial_bytes() == 0
            try:
                why = mismatch(runner.forward(synth, t), ref, ctx.config.rtol)
            except CopyPostponed as e:
                if not alone:
                    postponed.append((i, t))
                    continue
                why = f"its weight copies do not fit the budget together ({e})"
            except Exception as e:
                why = f"raised {type(e).__name__}: {e}"
            if why is None:
                correct.append((i, t))
            else:
                rejected.append(f"{runner.name}[{t!r}]: {why}")
    order = {c: n for n, c in enumerate(candidates)}
    return sorted(correct, key=order.__getitem__), rejected, postponed


def _timed(
    runners: Sequence[TunableRunner],
    synth: list,
    candidates: list[tuple[int, Tactic]],
    settings: ProfilerSettings,
    min_gain: float,
    team: Team | None,
    remake: WeightCache | None = None,
) -> list[Timing | None]:
    """Timings of ``candidates`` (the default first), interleaved; on a CPU without a team, those
    ahead of the default but within the noise get more rounds (``settle_cpu``). With ``remake``
    (weights that change between calls), a candidate reading a weight copy makes it again in each
    timed call: the trial's copies are dropped first (``WeightCache.next_round``)."""

    def fn(runner: TunableRunner, tactic: Tactic) -> Callable[[], Any]:
        if remake is None or runner.copy_kind(tactic) is None:
            return lambda: runner.forward(synth, tactic)

        def remade() -> Any:
            remake.next_round()
            return runner.forward(synth, tactic)

        return remade

    fns = [fn(runners[i], t) for i, t in candidates]
    device = next((x.device for x in synth if isinstance(x, torch.Tensor)), torch.device("cpu"))
    timed = time_candidates(fns, device, settings)
    kept = [n for n, tm in enumerate(timed) if tm is not None]
    if team is None and device.type == "cpu":  # a candidate ahead of the default but within the noise
        settled = settle_cpu([fns[n] for n in kept], [timed[n] for n in kept], min_gain, settings)
        for n, tm in zip(kept, settled):
            timed[n] = tm
    return timed


@dataclass(frozen=True)
class _Share:
    """What one rank found for its share of a bucket's candidates."""

    timed: list[tuple[int, int, Tactic, Timing]]  # (listed position, runner index, tactic, timing)
    rejected: list[str]
    synthesized: int


def _tune_share(
    ctx: OpContext,
    runners: Sequence[TunableRunner],
    inputs: Sequence[Any],
    bucket: tuple[int, ...],
    settings: ProfilerSettings,
    min_gain: float,
    generator: Callable[[torch.device], torch.Generator],
    team: Team | None,
    copies: WeightCache | None = None,
    layout: str | None = None,
) -> _Share:
    """Check and time this rank's share of the bucket's listed candidates (``team.share``; without
    a team, all of them), on inputs synthesized here."""
    synth, shapes, made = synthesize(inputs, ctx.config, bucket, generator)
    listed, rejected = _listed_candidates(runners, synth, BucketProfile(bucket, shapes), layout)
    ref = runners[0].forward(synth, DEFAULT_TACTIC)  # the default must work: its error is the op's
    mine = listed if team is None else [listed[n] for n in team.share(len(listed))]
    candidates, wrong, postponed = _checked(ctx, runners, synth, ref, mine, copies)
    rejected += wrong
    position = {c: n for n, c in enumerate(listed)}
    if len(listed) == 1 or (team is None and len(candidates) == 1 and not postponed):  # nothing to choose
        untimed = [(0, 0, DEFAULT_TACTIC, Timing(0.0, 0.0, 0.0))]
        return _Share(untimed if (0, DEFAULT_TACTIC) in candidates else [], rejected, made)
    timed: list[tuple[int, int, Tactic, Timing]] = []
    base: Timing | None = None  # the default's timing in the first round
    while candidates:
        remake = copies if ctx.config.weights_change else None
        times = _timed(runners, synth, candidates, settings, min_gain, team, remake)
        for (i, t), tm in zip(candidates, times):
            if tm is None:
                rejected.append(f"{runners[i].name}[{t!r}]: cannot be captured in a CUDA graph")
        own = times[0] if candidates[0] == (0, DEFAULT_TACTIC) else None
        if base is None:
            base = own
        for c, tm in zip(candidates, times):
            if tm is not None and (base is own or c != (0, DEFAULT_TACTIC)):  # the default: first round's
                timed.append((position[c], *c, tm if base is own else tm.relative_to(own, base)))
        if not postponed or copies is None or team is not None:  # a team's shares are timed once
            rejected += [f"{runners[i].name}[{t!r}]: no room for its weight copy" for i, t in postponed]
            break
        copies.next_round()  # a later round: the postponed candidates beside the default, with room
        candidates, wrong, postponed = _checked(ctx, runners, synth, ref, [(0, DEFAULT_TACTIC), *postponed], copies)
        rejected += wrong
    return _Share(timed, rejected, made)


def tune_bucket(
    ctx: OpContext,
    runners: Sequence[TunableRunner],
    inputs: Sequence[Any],
    bucket: tuple[int, ...],
    settings: ProfilerSettings,
    min_gain: float,
    generator: Callable[[torch.device], torch.Generator],
    team: Team | None = None,
    copies: WeightCache | None = None,
    layout: str | None = None,
    copy_min_gain: float = 0.2,
) -> Tuned:
    """Profile every valid (runner, tactic) of ``bucket`` on inputs synthesized from ``inputs``
    (random values from ``generator(device)``) and return the winner. With a lockstep ``team``,
    each rank checks and times its share of the candidates and every rank picks the same winner
    from everyone's timings (``Tuned.timed`` counts this rank's timings only). ``copies``: the
    weight cache the candidates' ``forward`` calls admit their copies into, as one trial
    (``WeightCache.trial``: all dropped when the bucket is decided); ``layout``: the kind of copy this
    shape's weights hold already, if any (see the module doc)."""
    with copies.trial() if copies is not None else contextlib.nullcontext():
        if team is None:
            shares = [_tune_share(ctx, runners, inputs, bucket, settings, min_gain, generator, None, copies, layout)]
        else:
            what = f"tuning {ctx.op} bucket {bucket}"
            shares = team.run_shared(
                what,
                lambda: _tune_share(ctx, runners, inputs, bucket, settings, min_gain, generator, team, copies, layout),
            )
        results = sorted((r for s in shares for r in s.timed), key=lambda r: r[0])
        rejected = [why for s in shares for why in s.rejected]
        if rejected:
            log.info("flashtune: %s bucket %s: never choosing %s", ctx.op, bucket, "; ".join(dict.fromkeys(rejected)))
        if log.isEnabledFor(logging.DEBUG):
            medians = (f"{runners[i].name}[{t!r}] {tm.median * 1e6:.1f}us" for _, i, t, tm in results)
            log.debug("flashtune: %s bucket %s medians: %s", ctx.op, bucket, ", ".join(medians))
        times = [tm for _, _, _, tm in results]  # the default (listed first, always correct) is times[0]
        kinds = [runners[i].copy_kind(t) for _, i, t, _ in results]  # the weight copy each reads
        no_copy = [n for n, kind in enumerate(kinds) if kind is None]  # [0, ...]
        if kinds[0] is not None:
            raise ValueError(
                f"flashtune: {ctx.op}: runner {runners[results[0][1]].name!r} is listed first (the default) but reads "
                "a weight copy; the default must run without one (it is what runs where a copy is refused)"
            )
        best = pick_winner(times, min_gain)
        if kinds[best] is not None:
            plain = no_copy[pick_winner([times[n] for n in no_copy], min_gain)]
            if not times[best].ahead_of(times[plain], copy_min_gain):
                best = plain  # not worth the memory of a copy
        fb = min(no_copy, key=lambda n: times[n].median)  # run where the winner's copy is refused
        _, idx, tactic, _ = results[best]
        kind = kinds[best]
    here = shares[0 if team is None else team.rank]
    timed_here = len(here.timed) if len(results) > 1 else 0
    entry = Entry(runners[idx].name, tactic, times[best].median, times[0].median, rejected=rejected)
    entry.timed = len(results) if len(results) > 1 else 0
    if kind is not None:
        entry.fallback_runner, entry.fallback_tactic, entry.fallback_s = (
            runners[results[fb][1]].name,
            results[fb][2],
            times[fb].median,
        )
    return Tuned(idx, tactic, entry, here.synthesized, timed_here)
