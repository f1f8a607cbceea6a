"""The kernel families that are compiled on a machine before first use, and ``prepare()``, which
builds them ahead of time (for images, deploy scripts and warmup) instead of at the first tuning."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Built:
    """What ``prepare`` did for one family: ``status`` is "ready" (built or loaded, ``seconds``),
    "skipped" (this machine cannot use it, ``detail`` says why) or "unavailable" (the build
    failed or another process's outlasted the wait; ``detail`` has the error)."""

    family: str
    what: str
    status: str
    seconds: float
    detail: str = ""


def _cpu() -> tuple[str, str | None, Callable[[], Any]]:
    from .cpp import load_blocked_gemm

    return "CPU kernel library", None, load_blocked_gemm


def _cuda() -> tuple[str, str | None, Callable[[], Any]]:
    from .cuda import load_skinny_gemm

    why = None
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = "needs a CUDA build of torch and an NVIDIA GPU"
    return "CUDA skinny GEMM kernel", why, load_skinny_gemm


COMPILED = {"cpu": _cpu, "cuda": _cuda}  # family -> (what, why this machine cannot use it, load)


def prepare(kernels: Iterable[str] | None = None) -> list[Built]:
    """Build, or load when already built on this machine, every compiled family in ``kernels``
    (default: all) that this machine can use. Never raises for a family that cannot be built: its
    row says "unavailable" and tuning goes on without it, as it would at first use."""
    chosen = set(COMPILED) if kernels is None else set(kernels)
    rows = []
    for family, describe in COMPILED.items():
        if family not in chosen:
            continue
        what, why, load = describe()
        if why is not None:
            rows.append(Built(family, what, "skipped", 0.0, why))
            continue
        start = time.perf_counter()
        try:
            load()
        except RuntimeError as e:
            rows.append(Built(family, what, "unavailable", time.perf_counter() - start, str(e)))
        else:
            rows.append(Built(family, what, "ready", time.perf_counter() - start))
    return rows
