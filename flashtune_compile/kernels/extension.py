"""Build a kernel extension once per machine and once per process, without ever hanging.

A family of compiled kernels (the CPU library, the CUDA extension) is built by
``torch.utils.cpp_extension`` on first use. Each build is named by a hash of everything that
changes the binary (``build_name``) and lives in ``build_root()/<name>``, a directory that only
ever appears complete: a build is compiled into a fresh ``<name>.building-*`` directory and renamed
into place when it has finished. One process builds a given name at a time, under a lock that the
operating system releases when its holder dies (``filelock``), so a build killed halfway (an OOM
kill, a scheduler's timeout) leaves a directory that the next builder removes, never a lock that
blocks everyone after it. A process that finds another building waits (it says so) at most
``FLASHTUNE_BUILD_WAIT_S`` seconds (default 600), then uses that build, or, if it is still not
done, goes on without the family.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

log = logging.getLogger("flashtune")

BUILD_WAIT_S = 600.0  # how long a process waits for another's build of the same family


def build_name(prefix: str, *parts: str) -> str:
    """``<prefix>_<hash of parts>``: a new name, hence a new build, whenever any part changes."""
    return f"{prefix}_{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:12]}"


def build_root() -> Path:
    """Where builds live: ``flashtune/py<version>`` under torch's extension directory
    (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); the names hash the rest."""
    from torch.utils.cpp_extension import get_default_build_root

    base = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(base) / "flashtune" / f"py{sys.version_info.major}{sys.version_info.minor}"


def build_wait_s() -> float:
    """``$FLASHTUNE_BUILD_WAIT_S`` (seconds, >= 0), else ``BUILD_WAIT_S``; ValueError naming the
    variable for anything else."""
    raw = os.environ.get("FLASHTUNE_BUILD_WAIT_S", "").strip()
    if not raw:
        return BUILD_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise ValueError(f"FLASHTUNE_BUILD_WAIT_S={raw!r}: expected a number of seconds >= 0")
    return value


def cxx_standard() -> str:
    """The C++ standard this torch's headers require (``c++17`` or ``c++20``), read from ATen.h's
    own check; what nvcc must be given, since torch 2.14's headers refuse anything older than C++20."""
    from torch.utils.cpp_extension import include_paths

    for root in include_paths():
        try:
            text = (Path(root) / "ATen" / "ATen.h").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found = re.search(r"__cplusplus\s*<\s*(\d{4})\d\dL", text)
        if found:
            return "c++" + found.group(1)[2:]
    return "c++17"


class BuildUnavailable(RuntimeError):
    """The family cannot be used by this process (another process's build outlasted the wait)."""


def built_module(what: str, name: str, compile_into: Callable[[str], Any], about_s: int) -> Any:
    """The Python module of build ``name``, imported from ``build_root()/<name>`` when that build is
    complete; otherwise compiled by ``compile_into(directory)`` (which builds there and returns the
    loaded module) into a fresh directory that is renamed to ``<name>`` once it has succeeded.

    Guarantees: a half-written build is never loaded; a build left unfinished by a process that died
    is removed by the next builder; only one process builds a name at a time; a process waits for
    another's build at most ``build_wait_s()`` seconds, then raises ``BuildUnavailable``. The first
    build logs one line before (``what``, about ``about_s`` seconds) and one after, with its time."""
    root = build_root()
    final = root / name
    module_path = final / f"{name}.so"
    if module_path.is_file():
        return _import(name, module_path)
    root.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(root / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        _wait_for_other(lock, what, root / f"{name}.lock")
    try:
        if module_path.is_file():  # the process we waited for built it
            log.warning("flashtune: using the %s another process built: %s", what, final)
            return _import(name, module_path)
        _remove_unfinished(root, name, final)
        building = tempfile.mkdtemp(prefix=f"{name}.building-", dir=root)
        log.warning("flashtune: building the %s for this machine (about %d s, once): %s", what, about_s, final)
        start = time.perf_counter()
        try:
            module = compile_into(building)
            if not (Path(building) / f"{name}.so").is_file():
                raise RuntimeError(f"the build finished without {name}.so in {building}")
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        log.warning("flashtune: built the %s in %.0f s; later processes load it", what, time.perf_counter() - start)
        return module
    finally:
        lock.release()


def _wait_for_other(lock: filelock.FileLock, what: str, path: Path) -> None:
    """Acquire ``lock``, which another process holds, within ``build_wait_s()``; say so, both ways."""
    wait = build_wait_s()
    log.warning("flashtune: waiting for another process's build of the %s (at most %.0f s; lock %s)", what, wait, path)
    start = time.perf_counter()
    try:
        lock.acquire(timeout=wait)
    except filelock.Timeout:
        raise BuildUnavailable(
            f"another process held the build lock {path} for more than {wait:.0f} s "
            "(FLASHTUNE_BUILD_WAIT_S); this process goes on without it"
        ) from None
    log.warning("flashtune: waited %.0f s for another process's build of the %s", time.perf_counter() - start, what)


def _remove_unfinished(root: Path, name: str, final: Path) -> None:
    """Remove what builds of ``name`` that stopped halfway left (the caller holds the build lock, so
    no live process is writing them)."""
    leftovers = glob.glob(str(root / f"{glob.escape(name)}.building-*"))
    if final.exists():  # a directory without the module: not made by built_module's rename
        leftovers.append(str(final))
    for path in leftovers:
        log.warning("flashtune: removing an unfinished build left by a process that stopped: %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _import(name: str, path: Path) -> Any:
    """Import the extension module ``name`` from the shared library at ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import the extension {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuiltOnce:
    """``get()`` returns ``build()``'s value, building it on the first call only. A build that
    raised is not retried: every later ``get()`` raises RuntimeError naming ``what`` and the cause."""

    def __init__(self, what: str, build: Callable[[], Any]) -> None:
        self.what = what
        self._build = build
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: BaseException | None = None

    def get(self) -> Any:
        if self._value is not None:
            return self._value
        with self._lock:
            if self._value is None:
                if self._error is not None:
                    raise RuntimeError(f"the {self.what} failed to build earlier: {self._error}") from self._error
                try:
                    self._value = self._build()
                except Exception as e:  # a compiler or toolchain error: do not retry on every call
                    self._error = e
                    raise RuntimeError(f"building the {self.what} failed: {e}") from e
        return self._value

    def failed(self) -> bool:
        """Whether a build was tried and failed."""
        return self._error is not None

    def ready(self) -> bool:
        """Whether the value is built (in this process)."""
        return self._value is not None
