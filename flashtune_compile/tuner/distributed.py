"""Tuning across the ranks of a ``torch.distributed`` job: every rank serves the same tactics.

Strategies (``$FLASHTUNE_DISTRIBUTED``, the backend option ``distributed``, or ``strategy=``):

- ``"auto"`` (the default): ``"lockstep"`` when ``torch.distributed`` is initialized with more than
  one rank in the group, else off.
- ``"lockstep"``: the ranks make the same calls in the same order (tensor or expert parallel). The
  first request of a bucket in this process (the same on every rank: it does not depend on what
  each rank's cache holds) is settled with the group: the ranks exchange what their caches hold;
  when the ranks that hold an entry agree and every rank offers it, everyone adopts it and nothing
  is profiled; otherwise the ranks tune the bucket together, each checking and timing its share of
  the candidates, and all pick the same winner from the gathered timings. Every rank caches it.
- ``"replicas"``: the ranks make independent calls (data parallel): no exchange per call;
  ``ft.warmup(..., distributed=True)`` splits the token counts across ranks and merges the winners.
- ``"off"``.

The tuner's collectives run on a gloo group over the same ranks (made once per group, so CPU
objects never go through NCCL), each bounded by a timeout (``$FLASHTUNE_DISTRIBUTED_TIMEOUT``
seconds, default 600, or ``ft.set_process_group(group, timeout=...)``): a rank that fails while
tuning makes every rank raise (the others a ``DistributedTuningError`` naming it), and a rank that
dies or never arrives makes the others raise within the timeout, never hang. Before its first
exchange a group checks that its ranks run the same flashtune, torch, Triton, CUDA and devices.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

STRATEGIES = ("auto", "lockstep", "replicas", "off")
DEFAULT_TIMEOUT_S = 600.0
CHECKED_ENV = ("flashtune", "torch", "triton", "cuda", "gpu", "cpu")  # what must match across ranks (cpu: if no GPU)
T = TypeVar("T")


class DistributedTuningError(RuntimeError):
    """Ranks could not settle a tuning decision together: one failed, died, timed out, or runs
    other software or devices (the message names the rank and the cause). Raised by the call that
    was tuning (a compiled model's call, ``ft.warmup``), on every rank; a RuntimeError.

    Example::

        try:
            ft.warmup(compiled, make_inputs)
        except ft.DistributedTuningError as e:
            print(f"rank {dist.get_rank()}: {e}")
            raise
    """


@dataclass
class _Selection:
    group: Any = None  # None: the default (world) group
    timeout_s: float | None = None  # None: $FLASHTUNE_DISTRIBUTED_TIMEOUT, else DEFAULT_TIMEOUT_S


_selection = _Selection()
_override: ContextVar[str | None] = ContextVar("flashtune_distributed", default=None)
_teams: dict[tuple, Team] = {}
_teams_lock = threading.Lock()


def set_process_group(group: Any = None, timeout: float | None = None) -> None:
    """Coordinate tuning over ``group`` instead of the whole job.

    Args:
        group: a ``torch.distributed`` process group (e.g. one tensor-parallel group), or None for
            the default (world) group.
        timeout: seconds any rank waits for the others in one exchange (None: the default).

    Raises:
        ValueError: ``timeout`` is not a positive number.

    Example::

        dist.init_process_group("nccl")
        ft.set_process_group(tp_group, timeout=600)
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"flashtune: the distributed timeout must be a positive number of seconds, got {timeout!r}")
    _selection.group, _selection.timeout_s = group, timeout


def strategy_from_env() -> str:
    """``$FLASHTUNE_DISTRIBUTED`` (default "auto"); ValueError naming it when it is not a strategy."""
    value = os.environ.get("FLASHTUNE_DISTRIBUTED", "auto").strip().lower() or "auto"
    if value in ("0", "false", "no"):
        value = "off"
    if value not in STRATEGIES:
        raise ValueError(f"FLASHTUNE_DISTRIBUTED={value!r} is not one of {list(STRATEGIES)}")
    return value


def timeout_s() -> float:
    """Seconds one exchange may wait: ``set_process_group``'s, else ``$FLASHTUNE_DISTRIBUTED_TIMEOUT``."""
    if _selection.timeout_s is not None:
        return _selection.timeout_s
    text = os.environ.get("FLASHTUNE_DISTRIBUTED_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"FLASHTUNE_DISTRIBUTED_TIMEOUT={text!r} is not a positive number of seconds")
    return value


@contextlib.contextmanager
def strategy(name: str) -> Iterator[None]:
    """Inside, this thread tunes under strategy ``name`` whatever the environment or a model's
    option says (e.g. ``ft.warmup`` runs its share of a data-parallel warmup as "replicas")."""
    if name not in STRATEGIES:
        raise ValueError(f"flashtune: distributed strategy must be one of {list(STRATEGIES)}, got {name!r}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def team() -> Team | None:
    """The ranks of the selected group (``set_process_group``, else the world), tuning together:
    None when ``torch.distributed`` is not initialized or the group has one rank."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = _selection.group
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    if len(ranks) < 2 or dist.get_rank() not in ranks:
        return None
    key = (ranks, timeout_s())
    with _teams_lock:
        found = _teams.get(key)
        if found is None:
            found = _teams[key] = Team(ranks, key[1])
    return found


def resolve(strategy: str | None = None) -> str:
    """What tuning does across ranks: "lockstep", "replicas" or "off". A ``strategy(...)`` block
    wins over ``strategy`` (a model's option), which wins over ``$FLASHTUNE_DISTRIBUTED``; without
    a team of several ranks (``team()``) every strategy is "off", and "auto" is "lockstep"."""
    name = _override.get() or strategy or strategy_from_env()
    if name not in STRATEGIES:
        raise ValueError(f"flashtune: distributed strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if name == "off" or team() is None:
        return "off"
    return "replicas" if name == "replicas" else "lockstep"


def settle(team: Team, what: str, key: Any, held: Any, allowed: bool, offers: Callable[[Any], bool]) -> Any | str:
    """Settle one bucket with every rank of a lockstep ``team`` (each calls this at the same point,
    ``what`` naming it): ``held`` is this rank's valid cache entry for ``key`` (or None), ``allowed``
    whether it may tune, ``offers(entry)`` whether its runner offers that entry's tactic here.

    Returns the entry every rank adopts (the holders agree and every rank offers it; or, with
    tuning off on some rank, the lowest rank's entry that every rank offers), "tune" when the ranks
    must tune the bucket together, or "default" (tuning is off somewhere and nothing can be adopted)."""
    exchanged = team.gather(what, (key, what, held, allowed))
    if any(k != key for k, _, _, _ in exchanged):
        points = "; ".join(f"rank {team.ranks[r]}: {w}" for r, (_, w, _, _) in enumerate(exchanged))
        raise DistributedTuningError(
            f"flashtune: ranks reached different tuning points ({points}). In lockstep mode every rank must make "
            "the same calls in the same order (tensor parallel); for independent replicas set "
            "FLASHTUNE_DISTRIBUTED=replicas"
        )
    proposals: dict[tuple, Any] = {}
    for _, _, entry, _ in exchanged:
        if entry is not None:
            proposals.setdefault((entry.runner, entry.tactic), entry)  # rank order: the lowest rank's first
    everyone_tunes = all(ok for _, _, _, ok in exchanged)
    candidates = list(proposals.values()) if len(proposals) == 1 or not everyone_tunes else []
    for proposal in candidates:
        if all(team.gather(what, offers(proposal))):
            return proposal
    return "tune" if everyone_tunes else "default"


class Team:
    """The ranks tuning together: this rank's place among them and their gloo group (made on the
    first exchange)."""

    def __init__(self, ranks: tuple[int, ...], timeout: float) -> None:
        self.ranks, self.timeout = ranks, timeout
        self.rank = ranks.index(torch.distributed.get_rank())
        self.size = len(ranks)
        self._group_made: Any = None
        self._broken: str | None = None  # the step whose failure stopped this team

    def share(self, n: int) -> list[int]:
        """This rank's share of ``n`` work items: item i goes to rank i % size."""
        return list(range(self.rank, n, self.size))

    def gather(self, what: str, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``what``: the step, for errors). Raises
        DistributedTuningError when a rank does not arrive within the timeout or died."""
        group = self._group()
        out: list[Any] = [None] * self.size
        try:
            torch.distributed.all_gather_object(out, obj, group=group)
        except Exception as e:  # gloo raises on a timeout and on a peer that closed its connection
            self._broken = what
            raise DistributedTuningError(
                f"flashtune: not every rank of {list(self.ranks)} reached {what} within {self.timeout:.0f} s, or one "
                f"died ({type(e).__name__}: {e}). In lockstep mode every rank must make the same calls in the same "
                "order; for independent replicas set FLASHTUNE_DISTRIBUTED=replicas"
            ) from e
        return out

    def run_shared(self, what: str, work: Callable[[], T]) -> list[T]:
        """``work()`` on this rank, then every rank's result in rank order. When ``work`` raises on a
        rank, every rank raises: that rank its own error, the others a DistributedTuningError naming it."""
        error: BaseException | None = None
        try:
            mine: tuple[str, Any] = ("ok", work())
        except BaseException as e:
            error, mine = e, ("error", f"{type(e).__name__}: {e}")
        try:
            gathered = self.gather(what, mine)
        except DistributedTuningError:
            if error is not None:
                raise error from None
            raise
        if error is not None:
            raise error
        failed = [(self.ranks[r], msg) for r, (status, msg) in enumerate(gathered) if status != "ok"]
        if failed:
            rank, msg = failed[0]
            raise DistributedTuningError(f"flashtune: rank {rank} failed while {what}: {msg}")
        return [value for _, value in gathered]

    def _group(self) -> Any:
        if self._broken is not None:
            raise DistributedTuningError(
                f"flashtune: tuning across ranks stopped after an earlier failure ({self._broken})"
            )
        if self._group_made is None:
            self._group_made = torch.distributed.new_group(
                list(self.ranks),
                timeout=datetime.timedelta(seconds=self.timeout),
                backend="gloo",
                use_local_synchronization=True,
            )
            self._check_environments()
        return self._group_made

    def _check_environments(self) -> None:
        """Raise DistributedTuningError naming what differs when the ranks' software or devices do."""
        from .cache import environment

        env = environment("")
        mine = {name: env.get(name) for name in CHECKED_ENV}
        if mine["gpu"] is not None:
            mine["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())  # this rank's GPU, not GPU 0
            mine["cpu"] = None  # GPU ranks may sit on different host CPUs
        everyone = self.gather("the check of versions and devices", mine)
        differing = [name for name in CHECKED_ENV if len({repr(e[name]) for e in everyone}) > 1]
        if differing:
            self._broken = "a version or device mismatch"
            detail = "; ".join(
                f"{name}: " + ", ".join(f"rank {self.ranks[r]} {e[name]!r}" for r, e in enumerate(everyone))
                for name in differing
            )
            raise DistributedTuningError(
                f"flashtune: ranks {list(self.ranks)} cannot tune together: they differ in {detail}"
            )
