"""Re-laid-out copies of weights (packed, transposed, upcast): at most one per weight, inside a
memory budget, never stale, and never made over and over.

A tactic asks for a copy with ``get(w, kind, make, nbytes)``, which returns the copy when it is
held and valid. Otherwise it raises: ``CopyMissing`` when nothing is decided yet, and the caller
asks ``admit`` (then calls again); ``CopyDenied`` when the copy will not be made, and the caller
runs a tactic that needs none (a site runs its bucket's best such tactic, ``tuner/site.py``).
A site's request (priced: ``gain``, seconds per call saved over the bucket's best tactic without a
copy, as the tuner measured it) waits until its weight has made ``promote_after`` calls (8) that
wanted it, running the fallback meanwhile, so a bucket used once (a prompt's prefill) holds no
memory. ``admit`` makes a copy only while the budget holds it, so every copy made stays resident.
When it does not fit, copies worth less time per byte make way for it, else it is refused. A
refused or displaced copy leaves a mark, so its weight's calls fall back at once for as long as
the weight is unchanged: nothing is re-packed per call. A weight holds copies of one kind only,
the first made (a view of a parameter counts as the parameter).

Validity: a copy is served only while its weight (the parameter, for a view computed in the
graph) is the same live object with the same version counter, data pointer, shape, stride and
dtype; after an in-place update (``w.add_``, ``optimizer.step()``, ``load_state_dict``) the copy
is made again if it is admitted again. A weight's death drops its copies and marks.

Budget (``budget()``): ``$FLASHTUNE_WEIGHT_CACHE_MB`` when set; else a tenth of the bytes of the
weights the compiled graphs read (``register``), so copies beside them add at most 10% to a model's
memory (and at least 256 MiB, so small models get every copy). Either way, never more than the
memory the machine has available less a reserve, so copies never push a process into swap or the
OOM killer.

Tuning (``trial``): while one bucket is profiled, each candidate's copy is admitted if it fits
without displacing anything; when the bucket is decided, every copy its candidates made is dropped,
the winner's too (its weights' sites ask for it again, as above), so tuning leaves no copy behind.
A copy that does not fit only because of the copies this trial's other candidates hold is
postponed (``CopyPostponed``): the tuner times it in a later round, after ``next_round`` drops
those, so a candidate is never left out for coming late, and a trial never holds more than the
budget.
The tuner owns one store (``AutoTuner.weights``), so a new tuner starts with none.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .memory import available_bytes, size_text

log = logging.getLogger("flashtune")

_PARAMETER = torch.nn.Parameter
# Tensors that are model state without being parameters (a quantized weight's integers and scales,
# buffers or a tensor subclass's inner tensors): ``mark_state`` adds them, so their copies are kept.
_STATE: dict[int, weakref.ref] = {}  # id -> the tensor (a WeakSet would compare tensors by value)
DEFAULT_SHARE = 0.10  # without $FLASHTUNE_WEIGHT_CACHE_MB: copies may add this share of the weights' bytes
MIN_DEFAULT_BUDGET = 256 * 2**20  # ... or this much, whichever is more
PROMOTE_AFTER = 8  # a site's copy is made on its weight's 8th call that wants it


def _meta(owner: torch.Tensor) -> tuple:
    """What must not have changed since a copy of ``owner`` was made."""
    return owner._version, owner.data_ptr(), owner.shape, owner.stride(), owner.dtype


class CopyDenied(RuntimeError):
    """The weight copy a tactic needs is not held and will not be made (the budget is full, or the
    weight holds another kind of copy): run a tactic that needs none."""


class CopyPostponed(CopyDenied):
    """In a tuning trial: the copy does not fit beside the copies the trial's other candidates hold,
    and would fit without them (``WeightCache.next_round``)."""


@dataclass
class CopyRequest:
    """A copy ``get`` found no decision for: what ``admit`` needs to decide and make it."""

    key: tuple
    owners: tuple[torch.Tensor, ...]  # whose life and version the copy follows
    meta: tuple  # what must not change while the copy is held (_meta, of every owner for several)
    kind: str
    make: Callable[[], Any]
    nbytes: int


class CopyMissing(Exception):
    """``get`` has no decision for ``request``: call ``admit(request, gain)``, then call again."""

    def __init__(self, request: CopyRequest) -> None:
        super().__init__(f"no decision yet for a {request.kind} copy of {request.nbytes} bytes")
        self.request = request


@dataclass(eq=False)
class _Held:
    """A copy held (``value``), or a refusal mark (``value`` None) with the reason."""

    refs: tuple  # weakrefs to the owners
    meta: tuple
    value: Any
    nbytes: int
    kind: str
    gain: float | None = None  # seconds per call saved; None: not known (library use, a trial)
    trial: bool = False
    why: str = ""
    owner_ids: tuple = field(default=())


class WeightCache:
    """Copies of weights by (weight, kind), at most one kind per weight, within ``budget()``; one
    per tuner (``AutoTuner.weights``). A hit reads the entries without the lock (a dict read is
    atomic under the GIL); deciding, making and dropping take it."""

    def __init__(
        self,
        max_bytes: int | None = None,
        share: float = DEFAULT_SHARE,
        floor: int = MIN_DEFAULT_BUDGET,
        promote_after: int = PROMOTE_AFTER,
    ) -> None:
        """``max_bytes``: the budget in bytes (None: ``share`` of the registered weights' bytes, at
        least ``floor``); either way capped by the memory available (``available_bytes``).
        ``promote_after``: the calls a priced request waits (see the module docstring)."""
        self.max_bytes = max_bytes
        self.share, self.floor, self.promote_after = share, floor, promote_after
        self._waiting: dict[tuple, tuple[weakref.ref, int]] = {}  # key -> (first owner, calls so far)
        self._entries: dict[tuple, _Held] = {}
        self._kinds: dict[int, str] = {}  # id(owner) -> the kind of copy it holds
        self._chosen: dict[int, tuple[weakref.ref, str]] = {}  # id(owner) -> (ref, kind a tuned winner reads)
        self._lock = threading.RLock()  # re-entrant: a weakref callback may fire inside it (GC)
        self._weights: dict[int, tuple[weakref.ref, int]] = {}  # registered weights: id -> (ref, bytes)
        self._weight_bytes = 0
        self._trial: list[tuple] | None = None  # keys admitted while tuning one bucket
        self._trial_thread: int | None = None
        self._said: set[tuple] = set()
        self.nbytes = 0  # bytes held by copies
        self.made = 0  # copies made (a stale copy is made again)
        self.denied = 0  # requests refused
        self.displaced = 0  # copies dropped to make way for ones worth more per byte
        self.fallback_calls = 0  # warm calls a copy-reading tactic left to its fallback (waiting or refused)

    # -- what a weight is ---------------------------------------------------------------------

    @staticmethod
    def parameter_of(w: torch.Tensor) -> torch.Tensor | None:
        """The parameter (or tensor marked as model state, ``mark_state``) ``w`` is, or is a view
        of; None for anything else. Only such weights live across calls (a weight computed inside
        the graph is a new tensor each call, so its copy would be remade every time), and inference
        tensors have no version counter to detect updates, so neither kind is cached."""
        for t in (w, w._base):
            if t is None or t.is_inference():
                continue
            # marked state first: Parameter's isinstance check runs Python code (a metaclass hook)
            if ((ref := _STATE.get(id(t))) is not None and ref() is t) or isinstance(t, torch.nn.Parameter):
                return t
        return None

    @staticmethod
    def mark_state(tensors: Iterable[torch.Tensor]) -> None:
        """Treat these tensors as model state, like parameters: weights whose copies are worth
        keeping (each for as long as it lives; updates are detected as for parameters)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                ident = id(t)
                _STATE[ident] = weakref.ref(t, lambda _, i=ident: _STATE.pop(i, None))

    @staticmethod
    def cacheable(w: torch.Tensor) -> bool:
        """Whether copies of ``w`` are worth keeping: ``w`` is a parameter or a view of one."""
        return WeightCache.parameter_of(w) is not None

    @staticmethod
    def _identity(w: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple]:
        """``(owner, key, meta)``: the tensor whose life and version a copy of ``w`` follows (the
        parameter, for a view of one), its key part, and what must not have changed."""
        owner = WeightCache.parameter_of(w)
        if owner is None or owner is w:
            owner, view = w, ()
        else:
            view = (tuple(w.shape), w.stride(), w.storage_offset(), w.dtype)
        return owner, (id(owner), view), _meta(owner)

    # -- the warm path ---------------------------------------------------------------------------

    def get(
        self,
        w: torch.Tensor | tuple[torch.Tensor, ...],
        kind: str,
        make: Callable[[Any], Any],
        nbytes: int,
    ) -> Any:
        """``make(w)`` as held: the copy of this kind when it is held and valid (for a view of a
        parameter: made from this same view of the parameter as it is now). ``w`` may be a tuple
        of weights (one copy made from several, e.g. gate and up packed together), valid only
        while every one of them is. ``nbytes``: what the copy will take. Raises ``CopyDenied``
        when the copy will not be made, ``CopyMissing`` when it is not decided yet."""
        if type(w) is _PARAMETER:  # the warm path's common case, its identity read directly
            owner, key, meta = w, (kind, (id(w), ())), _meta(w)
        elif isinstance(w, tuple):
            owners, ident, meta = zip(*map(self._identity, w))  # meta: every owner's
            owner, key = owners[0], (kind, ident)
        else:
            owner, ident, meta = self._identity(w)
            key = (kind, ident)
        held = self._entries.get(key)
        # every owner's death drops the entry (weakref callbacks), so checking the first one suffices
        if held is not None and held.refs[0]() is owner and held.meta == meta:
            if held.value is not None:
                return held.value
            raise CopyDenied(f"flashtune: no {kind} copy of this weight: {held.why}")
        request = CopyRequest(
            key, owners if isinstance(w, tuple) else (owner,), meta, kind, lambda: make(w), int(nbytes)
        )
        raise CopyMissing(request)

    # -- deciding ------------------------------------------------------------------------------

    def admit(self, request: CopyRequest, gain: float | None = None, wait: bool = True) -> bool:
        """``decide``: True if the copy is now held."""
        return self.decide(request, gain, wait) is None

    def decide(self, request: CopyRequest, gain: float | None = None, wait: bool = True) -> str | None:
        """Decide ``request`` and, if admitted, make the copy now; None if it is now held, else why not.
        ``gain``: seconds per call the copy saves, as a site prices it; a priced request never
        replaces a weight's copy of another kind, and may displace copies worth less per byte.
        A priced request waits for ``promote_after`` calls first, unless ``wait`` is False (a
        call's further copies, once its first one has waited: one wait per call, not per copy).
        Unpriced (None: a direct ``forward`` call), it replaces the weight's copy of another kind
        (the caller asked for this tactic) but displaces nothing else. Inside ``trial`` (on the
        thread that opened it), copies of several kinds may coexist until the trial ends, nothing
        is displaced, and a refusal leaves no mark."""
        with self._lock:
            trial = self._trial if self._trial_thread == threading.get_ident() else None
            held = self._entries.get(request.key)
            if held is not None and self._valid(held, request):  # another thread decided it meanwhile
                return None if held.value is not None else held.why
            self._drop(request.key)  # stale: its weight changed since
            self.register(request.owners)
            if trial is None and gain is None:
                self._drop_other_kinds(request)
            if trial is None and gain is not None and wait and self._waits(request):
                return f"waiting for {self.promote_after} calls"
            why = self._refusal(request, None if trial is not None else gain)
            if why is not None:
                if trial is None:  # in a trial this is only a candidate the tuner rejects, with this reason
                    self.denied += 1
                    self._say_left_out(request, why)
                    self._put(request, None, 0, gain, why=why)
                return why
            value = request.make()
            self.made += 1
            self._put(request, value, request.nbytes, gain, trial=trial is not None)
            log.debug(
                "flashtune: made a %s copy of a %s weight (%s; %s held)",
                request.kind,
                list(request.owners[0].shape),
                size_text(request.nbytes),
                size_text(self.nbytes),
            )
            if trial is not None:
                trial.append(request.key)
            return None

    def _waits(self, request: CopyRequest) -> bool:
        """Count one more call of a priced request; whether it must still wait (no mark is left)."""
        ref, calls = self._waiting.get(request.key, (None, 0))
        if ref is None or ref() is not request.owners[0]:
            ref, calls = weakref.ref(request.owners[0]), 0
        calls += 1
        if calls < self.promote_after:
            self._waiting[request.key] = (ref, calls)
            return True
        self._waiting.pop(request.key, None)
        return False

    def _drop_other_kinds(self, request: CopyRequest) -> None:
        ids = {id(o) for o in request.owners}
        for key, held in list(self._entries.items()):
            if held.kind != request.kind and not held.trial and ids & set(held.owner_ids):
                self._drop(key)

    def _refusal(self, request: CopyRequest, gain: float | None) -> str | None:
        """Why ``request`` cannot be held (None: it can, after displacing what ``_victims`` names,
        which this drops). Call under the lock."""
        kind = self._other_kind(request)
        if kind is not None:
            return f"the weight holds a {kind} copy already (one copy per weight)"
        budget, source = self.budget_and_source()
        if request.nbytes > budget:
            return f"{size_text(request.nbytes)} is more than the whole budget ({size_text(budget)}: {source})"
        need = self.nbytes + request.nbytes - budget
        if need <= 0:
            return None
        victims = self._victims(need, gain / request.nbytes) if gain is not None and request.nbytes > 0 else None
        if victims is None:
            return f"the budget ({size_text(budget)}: {source}) is full and nothing held is worth less per byte"
        for key in victims:
            victim = self._entries[key]
            self.displaced += 1
            self._drop(key)
            victim.value, victim.nbytes, victim.why = None, 0, "displaced by a copy worth more time per byte"
            self._entries[key] = victim  # the mark: its calls fall back from now on
        return None

    def _other_kind(self, request: CopyRequest) -> str | None:
        """The kind of copy one of ``request``'s weights holds when it is not the request's kind."""
        for o in request.owners:
            kind = self._kinds.get(id(o))
            if kind is not None and kind != request.kind:
                return kind
        return None

    def _victims(self, need: int, per_byte: float) -> list[tuple] | None:
        """Held copies worth less time per byte than ``per_byte``, cheapest first, freeing at least
        ``need`` bytes; None if they do not add up to it."""
        cheaper = [
            (h.gain / h.nbytes, key)
            for key, h in self._entries.items()
            if h.value is not None
            and not h.trial
            and h.gain is not None
            and h.nbytes > 0
            and h.gain / h.nbytes < per_byte
        ]
        chosen, freed = [], 0
        for _, key in sorted(cheaper):
            if freed >= need:
                break
            chosen.append(key)
            freed += self._entries[key].nbytes
        return chosen if freed >= need else None

    def _valid(self, held: _Held, request: CopyRequest) -> bool:
        return held.refs[0]() is request.owners[0] and held.meta == request.meta

    def _put(
        self, request: CopyRequest, value: Any, nbytes: int, gain: float | None, why: str = "", trial: bool = False
    ) -> None:
        key = request.key
        refs = tuple(weakref.ref(o, lambda _, key=key: self._forget(key)) for o in request.owners)
        ids = tuple(id(o) for o in request.owners)
        self._entries[key] = _Held(refs, request.meta, value, nbytes, request.kind, gain, trial, why, ids)
        self.nbytes += nbytes
        if value is not None and not trial:
            for i in ids:
                self._kinds[i] = request.kind

    def _drop(self, key: tuple) -> None:
        held = self._entries.pop(key, None)
        if held is None:
            return
        self.nbytes -= held.nbytes
        if held.value is not None and not any(
            h.value is not None and not h.trial and h.kind == held.kind and set(h.owner_ids) & set(held.owner_ids)
            for h in self._entries.values()
        ):
            for i in held.owner_ids:
                if self._kinds.get(i) == held.kind:
                    del self._kinds[i]

    def _forget(self, key: tuple) -> None:
        with self._lock:
            self._drop(key)

    # -- tuning ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        """Copies admitted inside (on this thread) are the candidates' of one bucket: admitted only
        if they fit as they are, and all dropped when it ends."""
        with self._lock:
            outer = (self._trial, self._trial_thread)
            self._trial, self._trial_thread = [], threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                for key in self._trial or ():
                    held = self._entries.get(key)
                    if held is not None and held.trial:
                        self._drop(key)
                self._trial, self._trial_thread = outer

    def next_round(self) -> None:
        """Drop the copies the trial open on this thread holds (the trial goes on): the candidates
        postponed for room can then make theirs."""
        with self._lock:
            if self._trial_thread != threading.get_ident():
                return
            for key in self._trial or ():
                held = self._entries.get(key)
                if held is not None and held.trial:
                    self._drop(key)
            self._trial = []

    def trial_bytes(self) -> int:
        """Bytes of the copies the trial open on this thread holds (0 outside one)."""
        with self._lock:
            if self._trial_thread != threading.get_ident():
                return 0
            return sum(h.nbytes for k in self._trial or () if (h := self._entries.get(k)) is not None and h.trial)

    def fits_after_round(self, request: CopyRequest) -> bool:
        """Whether ``request``, just refused inside a trial, would fit once ``next_round`` drops the
        trial's copies (it is refused only because of them)."""
        with self._lock:
            trial_bytes = self.trial_bytes()
            if trial_bytes == 0 or self._other_kind(request) is not None:
                return False  # (the weight holding a copy of another kind is a refusal of its own)
            return self.nbytes - trial_bytes + request.nbytes <= self.budget()

    def held_kind(self, tensors: Iterable[Any]) -> str | None:
        """The kind of copy the first of ``tensors`` that has one holds, or else that a winner
        tuned in this process reads (``chose``); parameters or views of them, anything else
        skipped; None if none has either."""
        owners = [self.parameter_of(t) for t in tensors if isinstance(t, torch.Tensor)]
        owners = [o for o in owners if o is not None]
        for o in owners:
            if (kind := self._kinds.get(id(o))) is not None:
                return kind
        for o in owners:
            ref, kind = self._chosen.get(id(o), (None, None))
            if ref is not None and ref() is o:
                return kind
        return None

    def chose(self, tensors: Iterable[Any], kind: str) -> None:
        """Note that a winner just tuned reads ``kind`` copies of these weights (before any is
        made: a copy waits for its weight's calls). ``held_kind`` answers it from then on, so the
        buckets tuned next, in this graph or another one over the same weights (Dynamo compiles
        T = 1 apart), choose tactics reading that same copy: a weight holds one copy, and a
        bucket whose winner reads another kind would run its fallback."""
        with self._lock:
            for t in tensors:
                owner = self.parameter_of(t) if isinstance(t, torch.Tensor) else None
                held = self._chosen.get(id(owner)) if owner is not None else None
                if owner is not None and (held is None or held[0]() is not owner):  # the first winner's kind stays
                    self._chosen[id(owner)] = (weakref.ref(owner), kind)

    # -- the budget ----------------------------------------------------------------------------

    def register(self, weights: Iterable[torch.Tensor]) -> None:
        """Count these weights (parameters, or what they view) among the model's: the default
        budget is a share of their bytes. Each is counted once, for as long as it lives."""
        with self._lock:
            for w in weights:
                param = self.parameter_of(w)
                owner = param if param is not None else w
                ident = id(owner)
                if ident in self._weights:
                    continue
                size = owner.untyped_storage().nbytes() if owner.device.type != "meta" else 0
                ref = weakref.ref(owner, lambda _, i=ident: self._unregister(i))
                self._weights[ident] = (ref, size)
                self._weight_bytes += size

    def _unregister(self, ident: int) -> None:
        with self._lock:
            found = self._weights.pop(ident, None)
            if found is not None:
                self._weight_bytes -= found[1]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the registered weights that are alive."""
        return self._weight_bytes

    def budget_and_source(self) -> tuple[int, str]:
        """The bytes copies may hold now, and what set that (see the module docstring)."""
        if self.max_bytes is not None:
            limit, source = self.max_bytes, "FLASHTUNE_WEIGHT_CACHE_MB"
        else:
            limit = max(self.floor, int(self.share * self._weight_bytes))
            weights, floor = size_text(self._weight_bytes), size_text(self.floor)
            source = f"{self.share:.0%} of the weights' {weights}, at least {floor}"
        free = available_bytes()
        if free is not None and self.nbytes + free < limit:
            return max(0, self.nbytes + free), f"{source}, cut to the memory available"
        return limit, source

    def budget(self) -> int:
        return self.budget_and_source()[0]

    def _say_left_out(self, request: CopyRequest, why: str) -> None:
        """Log once per kind, weight shape and reason that copies were left out."""
        owner = request.owners[0]
        what = (request.kind, tuple(owner.shape), why.split(" (")[0])
        if what in self._said:
            return
        self._said.add(what)
        log.info(
            "flashtune: leaving out %s copies of %s %s weights (%s each): %s; their calls run a tactic "
            "that needs no copy",
            request.kind,
            list(owner.shape),
            str(owner.dtype).removeprefix("torch."),
            size_text(request.nbytes),
            why,
        )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._kinds.clear()
            self._chosen.clear()
            self._waiting.clear()
            self.nbytes = 0


def admitting(store: WeightCache, call: Callable[[], Any], gain: float | None = None) -> Any:
    """``call()``, admitting into ``store`` each weight copy it asks for (priced at ``gain``);
    ``CopyDenied`` when one is refused."""
    while True:
        try:
            return call()
        except CopyMissing as miss:
            request = miss.request
        why = store.decide(request, gain)
        if why is not None:
            denied = CopyPostponed if store.fits_after_round(request) else CopyDenied
            raise denied(f"flashtune: no {request.kind} weight copy ({size_text(request.nbytes)}): {why}")
