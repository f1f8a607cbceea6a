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
    """The process's counters since the last ``reset_stats()``, as a new dict.

    Tuning: ``hits`` (calls whose bucket was cached), ``misses`` (buckets looked up and not
    found), ``profiles`` (candidates timed), ``synthesized``, ``tuning_seconds``, ``fallbacks``
    (unseen buckets run on the default with tuning off), ``rejected`` (candidates that failed or
    disagreed with the default). Compiling: ``routed_ops`` (calls routed to flashtune's ops),
    ``handed_back`` (training calls returned to ATen), ``compiles``. Weight copies (docs/weights.md),
    as they stand now: ``weight_cache_bytes`` held, ``weight_cache_budget`` (bytes they may hold),
    ``weight_copies_made``, ``weight_copies_denied`` (those calls ran a tactic needing no copy),
    ``weight_copies_displaced`` (dropped for copies worth more time per byte) and
    ``weight_copy_fallback_calls`` (warm calls whose tactic's copy was not held, so its fallback ran).

    Raises:
        Nothing.

    Example::

        compiled(x)
        print(ft.stats()["routed_ops"], ft.stats()["profiles"])
    """
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
    """Zero every counter of ``stats()`` (the weight copies themselves stay).

    Raises:
        Nothing.

    Example::

        ft.reset_stats()
        compiled(x)
        assert ft.stats()["profiles"] == 0  # a warm process: every bucket was a cache hit
    """
    AutoTuner.get().reset_stats()


def tactics() -> list[dict[str, Any]]:
    """One dict per cached winner, of the default cache and of every cache a compiled model named
    with ``cache_dir``: ``op``, ``shape_key`` (the static shapes), ``bucket``, ``kernel`` (the
    runner's name), ``tactic``, ``time_s``, ``default_s``, ``speedup`` (over the default),
    ``tune_s``, ``cache_dir``.

    Raises:
        Nothing.

    Example::

        for w in ft.tactics():
            print(w["op"], w["bucket"], w["kernel"], w["tactic"], f"{w['speedup']:.2f}x")
    """
    return AutoTuner.get().tactics()


def save_cache(path: str | Path) -> int:
    """Write every winner of the default cache to ``path`` as one JSON document.

    Args:
        path: the file to write (replaced if it exists).

    Returns:
        How many winners were written.

    Raises:
        OSError: ``path`` cannot be written.

    Example::

        ft.save_cache("tactics.json")  # later, elsewhere: ft.load_cache("tactics.json")
    """
    return AutoTuner.get().cache.save(path)


def load_cache(path: str | Path) -> int:
    """Merge a document written by ``save_cache`` into the default cache (and write it through).

    Args:
        path: a file written by ``save_cache`` (or ``flashtune cache export``).

    Returns:
        How many winners the document held.

    Raises:
        CacheFileError: the file is unreadable, damaged, or from another environment (torch,
            triton, CUDA or flashtune version, GPU or CPU model, timing mode); nothing is merged.

    Example::

        ft.load_cache("tactics.json")
        compiled = torch.compile(model, backend="flashtune", options={"tune": "off"})
    """
    return AutoTuner.get().cache.load(path)


def clear_cache(disk: bool = True) -> None:
    """Forget every winner of the default cache.

    Args:
        disk: also delete this environment's cache file (default True); False forgets only what
            this process holds in memory.

    Raises:
        OSError: the file exists and cannot be deleted.

    Example::

        ft.clear_cache()  # the next call of each bucket tunes again
    """
    AutoTuner.get().cache.clear(disk=disk)


def prepare(kernels: Iterable[str] | None = None) -> list[builds.Built]:
    """Build now, instead of at the first tuning that needs it, every compiled kernel family in
    ``kernels`` (default: every family) that this machine can use: the CPU kernel library (about
    35 s) and, with a GPU, the CUDA extension (about 90 s). Each is built once per machine and
    loaded in later processes; a build another process left unfinished is removed and redone.

    Args:
        kernels: family names ("cpu", "cuda"; a str or an iterable), or None for every family.

    Returns:
        One ``Built`` row per compiled family (``status`` "ready", "skipped" or "unavailable",
        with seconds and the reason); a family that cannot be built is reported there, not
        raised, and tuning goes on without it.

    Raises:
        ValueError: an unknown family, naming the valid ones.

    Example, in an image's build step::

        python -c "import flashtune_compile as ft; print(ft.prepare())"   # or: flashtune build
    """
    chosen = None if kernels is None else ({kernels} if isinstance(kernels, str) else set(kernels))
    unknown = sorted(chosen - set(FAMILIES)) if chosen is not None else []
    if unknown:
        raise ValueError(f"ft.prepare: unknown kernel families {unknown}; valid: {list(FAMILIES)}")
    return builds.prepare(chosen)
