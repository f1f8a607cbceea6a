"""Re-laid-out copies of weights (transposed, packed, upcast), bounded in bytes, never stale.

An entry is keyed by the weight's identity and the kind of copy; for a view of a parameter
computed in the graph (``w.t()``, ``w.transpose(1, 2)``, ``w[e]``, ``w.expand(...)``: a new object
every call), by the parameter and the view's shape, strides and offset. It is served only while the
weight (the parameter, for a view) is the same live object with the same version counter, data
pointer, shape, stride and dtype: an in-place update (``w.add_``, ``optimizer.step()``, ``load_state_dict``) bumps the
version and the copy is made again. Least recently used entries are dropped past ``max_bytes``
(default 2 GiB, ``$FLASHTUNE_WEIGHT_CACHE_MB``); entries of weights that die go with them. The
tuner owns one (``AutoTuner.weights``), so a new tuner starts with none.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

_PARAMETER = torch.nn.Parameter


def _meta(owner: torch.Tensor) -> tuple:
    """What must not have changed since a copy of ``owner`` was made."""
    return owner._version, owner.data_ptr(), owner.shape, owner.stride(), owner.dtype


class WeightCache:
    """Copies of weights by (weight, kind); one per tuner (``AutoTuner.weights``). A hit reads the
    entries without the lock (a dict read and ``move_to_end`` are each atomic under the GIL);
    adding and dropping entries take it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.RLock()  # re-entrant: a weakref callback may fire inside it (GC)
        self.nbytes = 0
        self.made = 0  # copies made (a stale or evicted entry is made again)

    @staticmethod
    def parameter_of(w: torch.Tensor) -> torch.Tensor | None:
        """The parameter ``w`` is, or is a view of; None for anything else. Only parameters live
        across calls (a weight computed inside the graph is a new tensor each call, so its copy
        would be remade every time), and inference tensors have no version counter to detect
        updates, so neither kind is cached."""
        for t in (w, w._base):
            if isinstance(t, torch.nn.Parameter) and not t.is_inference():
                return t
        return None

    @staticmethod
    def cacheable(w: torch.Tensor) -> bool:
        """Whether copies of ``w`` are worth keeping: ``w`` is a parameter or a view of one."""
        return WeightCache.parameter_of(w) is not None

    def get(
        self,
        w: torch.Tensor | tuple[torch.Tensor, ...],
        kind: str,
        make: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``make(w)``, from the cache when a valid copy of this kind exists (for a view of a
        parameter: made from this same view of the parameter as it is now). ``w`` may be a tuple of
        weights (one copy made from several, e.g. gate and up packed together): the copy is then
        valid only while every one of them is."""
        if type(w) is _PARAMETER:  # the warm path's common case, its identity read directly
            owner, key, meta = w, (kind, (id(w), ())), _meta(w)
        elif isinstance(w, tuple):
            owners, ident, meta = zip(*map(self._identity, w))
            owner, key = owners[0], (kind, ident)
        else:
            owner, ident, meta = self._identity(w)
            key = (kind, ident)
        entry = self._entries.get(key)
        # every owner's death drops the entry (weakref callbacks), so checking the first one suffices
        if entry is not None and entry[0][0]() is owner and entry[1] == meta:
            try:  # a C method, atomic under the GIL; KeyError: another thread dropped it meanwhile
                self._entries.move_to_end(key)
            except KeyError:
                pass
            return entry[2]
        value = make(w)
        size = value.numel() * value.element_size()
        with self._lock:
            self._drop(key)
            self.made += 1
            if size <= self.max_bytes:
                alive = owners if isinstance(w, tuple) else (owner,)
                refs = tuple(weakref.ref(o, lambda _, key=key: self._forget(key)) for o in alive)
                self._entries[key] = (refs, meta, value, size)
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    self._drop(next(iter(self._entries)))
        return value

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

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[3]

    def _forget(self, key: tuple) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


def max_bytes_from_env() -> int:
    """``$FLASHTUNE_WEIGHT_CACHE_MB`` in bytes (default 2048 MiB); ValueError naming it if malformed."""
    text = os.environ.get("FLASHTUNE_WEIGHT_CACHE_MB", "2048")
    try:
        mb = int(text)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"FLASHTUNE_WEIGHT_CACHE_MB={text!r} is not a non-negative whole number of MiB")
    return mb * 2**20
