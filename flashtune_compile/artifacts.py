"""Offline artifacts: one file with the tactic cache and Inductor's compile artifacts.

Tune and compile once (``ft.warmup``), ``save_artifacts(path)``, ship the file; in a fresh process
``load_artifacts(path)`` before the first compile, and compiling hits Inductor's caches while every
tuned bucket is a tactic-cache hit: nothing is profiled.

The file is a zip archive:

- ``manifest.json``: format, version, the environment it was made under (flashtune, torch,
  triton, CUDA, GPU or CPU, timing mode: ``tuner.cache.environment``), counts, creation time;
- ``tactics.json``: the tactic cache document (``tuner/cache.py``'s format);
- ``inductor.bin``: ``torch.compiler.save_cache_artifacts()``'s bytes (absent when nothing was
  compiled by Inductor, e.g. with ``inner="eager"``);
- ``cpp/<path>``: the C++ kernel libraries Inductor built or loaded in this process, at their path
  in Inductor's cache dir. Inductor's own artifacts hold the kernels' source but not the built
  libraries, so without these a CPU process that hits Inductor's cache still spends seconds in the
  C++ compiler. Each library is named by a hash of its source and full compile command, so one
  is only ever loaded by an identical compile request; elsewhere it is simply not found.

Guarantees: ``load_artifacts`` checks the whole manifest and parses the tactics before it uses
anything; a file made under another environment, or damaged, raises ``ArtifactError`` (naming the
differing fields) and nothing of it is used. flashtune itself executes and unpickles nothing from
the file, but Inductor's artifacts and the kernel libraries are compiled code that Inductor will
run: load only artifacts you made or trust, as with any compile cache.
"""

from __future__ import annotations

import json
import logging
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from .tuner.autotuner import AutoTuner
from .tuner.cache import CacheFileError, atomic_write, env_diff, parse_document, to_document

log = logging.getLogger("flashtune")

KIND = "flashtune-artifacts"
VERSION = 1
_IMPORTED_AT = time.time()
_LIBRARY = re.compile(r"[a-z0-9]{2}/c[a-z0-9]{16,}(\.main)?\.so")  # Inductor's "<key[1:3]>/<key>[.main].so"


class ArtifactError(CacheFileError):
    """An artifact file that cannot be used: unreadable, damaged, or made under another environment
    (its message names each differing field). Raised by ``load_artifacts``, before anything of the
    file is used. A subclass of ``CacheFileError``.

    Example::

        try:
            ft.load_artifacts("model.ftart")
        except ft.ArtifactError as e:
            print("tuning from scratch:", e)
    """


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive holding a flashtune manifest (contents not checked)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "manifest.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _is_tactic_document(path: Path) -> bool:
    """Whether ``path`` holds a valid tactic cache document (of any environment)."""
    try:
        parse_document(json.loads(path.read_text()), str(path), None)
        return True
    except (OSError, ValueError, UnicodeDecodeError):  # JSONDecodeError and CacheFileError are ValueErrors
        return False


def _inductor_libraries() -> dict[str, bytes]:
    """The C++ libraries Inductor loaded in this process, and those built in its cache dir since
    flashtune was imported (e.g. the CPU-ISA probe it builds once per cache dir), by path relative
    to that dir. Best effort: {} (and a debug line) where Inductor's layout is not the one expected."""
    try:
        from torch._inductor import codecache
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        keys = (
            set(codecache.CppCodeCache.cache)
            | set(codecache.CppPythonBindingsCodeCache.cache)
            | set(codecache.CppWrapperCodeCache.cache)
        )
        root = Path(cache_dir())
        files = {f for key in keys for f in (root / key[1:3]).glob(f"{key}*.so")}
        files |= {f for f in root.glob("*/c*.so") if f.stat().st_mtime >= _IMPORTED_AT}
        found = {f.relative_to(root).as_posix(): f for f in files}
        return {rel: f.read_bytes() for rel, f in sorted(found.items()) if _LIBRARY.fullmatch(rel)}
    except Exception as e:  # an Inductor internal moved: the artifact just lacks the libraries
        log.debug("flashtune: not bundling Inductor's C++ libraries (%s: %s)", type(e).__name__, e)
        return {}


def _restore_libraries(libraries: dict[str, bytes]) -> int:
    """Put bundled libraries into Inductor's cache dir where absent; returns how many were written."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root, written = Path(cache_dir()), 0
    for rel, data in libraries.items():
        target = root / rel
        if not target.exists():
            atomic_write(target, lambda f, data=data: f.write(data))
            written += 1
    return written


def save_artifacts(path: str | Path) -> dict[str, Any]:
    """Write every cached tactic of the default cache and this process's Inductor compile artifacts
    to ``path`` (one zip file, replaced atomically), with the C++ kernel libraries Inductor built
    for them, so that a fresh process can start with nothing profiled and nothing compiled.

    Args:
        path: the file to write, e.g. ``"model.ftart"``.

    Returns:
        Counts: ``tactics``, ``inductor`` (artifacts), ``libraries`` and ``bytes``.

    Raises:
        OSError: ``path`` cannot be written.

    Example::

        compiled = torch.compile(model, backend="flashtune", dynamic=True)
        ft.warmup(compiled, lambda n: (torch.randint(0, vocab, (1, n)),))
        ft.save_artifacts("model.ftart")
    """
    path = Path(path)
    tuner = AutoTuner.get()
    entries = tuner.cache.snapshot()
    elsewhere = [str(c.directory or "memory") for c in tuner.caches.values() if c is not tuner.cache and c.entries]
    if elsewhere:
        log.warning(
            "flashtune: %s holds the default tactic cache only; winners of models compiled with their own "
            "cache_dir (%s) stay there",
            path,
            ", ".join(elsewhere),
        )
    saved = torch.compiler.save_cache_artifacts()
    blob, inductor = (saved[0], sum(len(v) for v in saved[1].artifacts.values())) if saved else (b"", 0)
    libraries = _inductor_libraries() if inductor else {}
    manifest = {
        "kind": KIND,
        "version": VERSION,
        "env": tuner.cache.env,
        "created": time.time(),
        "tactics": len(entries),
        "inductor": inductor,
        "libraries": len(libraries),
    }

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            zf.writestr("tactics.json", json.dumps(to_document(tuner.cache.env, entries)))
            if blob:
                zf.writestr("inductor.bin", blob)
            for rel, data in libraries.items():
                zf.writestr(f"cpp/{rel}", data)

    atomic_write(path, write)
    size = path.stat().st_size
    log.info(
        "flashtune: saved %d tactics, %d Inductor artifacts and %d kernel libraries to %s (%d bytes)",
        len(entries),
        inductor,
        len(libraries),
        path,
        size,
    )
    if not inductor:
        log.info(
            "flashtune: no Inductor artifacts in this process (nothing compiled by Inductor yet, or "
            "inner='eager'); %s holds tactics only",
            path,
        )
    return {"tactics": len(entries), "inductor": inductor, "libraries": len(libraries), "bytes": size}


def _read(path: Path) -> tuple[dict[str, Any], Any, bytes, dict[str, bytes]]:
    """(manifest, tactics document, Inductor bytes, kernel libraries); ArtifactError if the archive
    is not one of ours."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "manifest.json" not in names or "tactics.json" not in names:
                raise ArtifactError(
                    f"{path}: not a flashtune artifact file (a zip archive without a flashtune manifest and tactics)"
                )
            manifest = json.loads(zf.read("manifest.json"))
            doc = json.loads(zf.read("tactics.json"))
            blob = zf.read("inductor.bin") if "inductor.bin" in names else b""
            libraries = {n.removeprefix("cpp/"): zf.read(n) for n in names if n.startswith("cpp/")}
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such artifact file") from None
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        if _is_tactic_document(path):
            raise ArtifactError(
                f"{path}: is a tactic cache document, not an artifact file; load it with "
                f"ft.load_cache or `flashtune cache import`"
            ) from None
        raise ArtifactError(f"{path}: not a readable flashtune artifact file ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ArtifactError(f"{path}: not a flashtune artifact file (manifest kind {manifest!r:.80})")
    if manifest.get("version") != VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {manifest.get('version')!r}; this flashtune reads version {VERSION}"
        )
    bad = sorted(rel for rel in libraries if not _LIBRARY.fullmatch(rel))
    if bad:
        raise ArtifactError(f"{path}: holds files that are not Inductor kernel libraries: {bad[:3]}")
    return manifest, doc, blob, libraries


def load_artifacts(path: str | Path) -> dict[str, Any]:
    """Use an artifact file made by ``save_artifacts``: its Inductor artifacts go into Inductor's
    caches and its tactics into the tactic cache (written through to disk). Call it before the
    first compile. Inductor's artifacts are compiled code: load only files you made or trust.

    Args:
        path: a file written by ``save_artifacts``.

    Returns:
        Counts: ``tactics``, ``inductor`` and ``libraries``.

    Raises:
        ArtifactError: the file is missing, damaged, or was made under another environment
            (torch, triton, CUDA or flashtune version, GPU or CPU); none of it is used.

    Example, in a fresh process::

        ft.load_artifacts("model.ftart")
        compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"tune": "off"})
    """
    path = Path(path)
    tuner = AutoTuner.get()
    manifest, doc, blob, libraries = _read(path)
    here = tuner.cache.env
    if manifest.get("env") != here:
        diff = env_diff(manifest.get("env"), here)
        said = ", ".join(f"{k} {theirs!r} (here {ours!r})" for k, (theirs, ours) in diff.items())
        raise ArtifactError(
            f"{path}: made under another environment, so none of it is used: {said}. "
            f"Make the artifact again on this machine and software (ft.warmup, then "
            f"ft.save_artifacts)."
        )
    try:
        entries = parse_document(doc, f"{path}:tactics.json", here)
    except CacheFileError as e:
        raise ArtifactError(str(e)) from None
    if tuner.stats.compiles:
        log.warning(
            "flashtune: load_artifacts(%s) after %d graph(s) were compiled in this process: those "
            "keep their compiled code; call it before the first compile",
            path,
            tuner.stats.compiles,
        )
    inductor = 0
    if blob:
        try:
            info = torch.compiler.load_cache_artifacts(blob)
        except Exception as e:  # Inductor's own format check: the bytes are damaged or foreign
            raise ArtifactError(
                f"{path}: Inductor refused its compile artifacts ({type(e).__name__}: {e}); nothing was loaded"
            ) from None
        inductor = sum(len(v) for v in info.artifacts.values()) if info else 0
    restored = _restore_libraries(libraries) if libraries else 0
    tuner.cache.merge_in(entries)
    log.info(
        "flashtune: loaded %d tactics, %d Inductor artifacts and %d kernel libraries (%d new here) from %s",
        len(entries),
        inductor,
        len(libraries),
        restored,
        path,
    )
    return {"tactics": len(entries), "inductor": inductor, "libraries": len(libraries)}
