"""The module-level functions of the public API; each acts on the process-wide AutoTuner.

The cache functions act on its default tactic cache ($FLASHTUNE_CACHE_DIR, else the user cache
dir); a model compiled with ``options={"cache_dir": ...}`` keeps its winners in that directory
(``AutoTuner.get().cache_for(directory)``, or ``flashtune --cache-dir``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .kernels import FAMILIES, builds
from .tuner.autotuner import AutoTuner


def stats() -> dict[str, Any]:
    """Counters since the last reset: hits, misses, profiles, synthesized, tuning_seconds, ...; and
    of the re-laid-out weight copies (tuner/weights.py), as they stand now: ``weight_cache_bytes``
    held, ``weight_cache_budget`` (bytes they may hold), ``weight_copies_made``,
    ``weight_copies_denied`` (requests refused: those calls ran a tactic needing no copy) and
    ``weight_copies_displaced`` (dropped to make way for copies worth more time per byte) and
    ``weight_copy_fallback_calls`` (warm calls whose tactic's copies were not held yet, or were
    refused, so its fallback tactic ran)."""
    tuner = AutoTuner.get()
    w = tuner.weights
    return {
        **tuner.stats_dict(),
        "weight_cache_bytes": w.nbytes,
        "weight_cache_budget": w.budget(),
        "weight_copies_made": w.made,
        "weight_copies_denied": w.denied,
        "weight_copies_displaced": w.displaced,
        "weight_copy_fallback_calls": w.fallback_calls,
    }


def reset_stats() -> None:
    """Zero every counter of ``stats()``."""
    AutoTuner.get().reset_stats()


def tactics() -> list[dict[str, Any]]:
    """One record per cached winner: op, shape_key, bucket, kernel, tactic, time_s, default_s, speedup,
    cache_dir; of the default cache and of every cache a compiled model named with ``cache_dir``."""
    return AutoTuner.get().tactics()


def save_cache(path: str | Path) -> int:
    """Write every cached winner to ``path`` as one JSON document; returns how many."""
    return AutoTuner.get().cache.save(path)


def load_cache(path: str | Path) -> int:
    """Merge a document written by ``save_cache`` (same environment only, else CacheFileError)."""
    return AutoTuner.get().cache.load(path)


def clear_cache(disk: bool = True) -> None:
    """Forget every cached winner; with ``disk``, delete this environment's cache file too."""
    AutoTuner.get().cache.clear(disk=disk)


def prepare(kernels: Iterable[str] | None = None) -> list[builds.Built]:
    """Build now, instead of at the first tuning that needs it, every compiled kernel family in
    ``kernels`` (default: every family) that this machine can use: the CPU kernel library (about
    35 s) and, with a GPU, the CUDA extension (about 90 s). Each is built once per machine and
    loaded in later processes; a build another process left unfinished is removed and redone.

    Returns one ``Built`` row per compiled family (``status`` "ready", "skipped" or "unavailable",
    with seconds and the reason); a family that cannot be built is reported there, not raised, and
    tuning goes on without it. ValueError naming the valid families for an unknown one.

    Example, in an image's build step::

        python -c "import flashtune_compile as ft; print(ft.prepare())"   # or: flashtune build
    """
    chosen = None if kernels is None else ({kernels} if isinstance(kernels, str) else set(kernels))
    unknown = sorted(chosen - set(FAMILIES)) if chosen is not None else []
    if unknown:
        raise ValueError(f"ft.prepare: unknown kernel families {unknown}; valid: {list(FAMILIES)}")
    return builds.prepare(chosen)
