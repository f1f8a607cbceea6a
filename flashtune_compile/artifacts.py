"""Offline artifacts: one file with the tactic cache and Inductor's compile artifacts.

Tune and compile once (``ft.warmup``), ``save_artifacts(path)``, ship the file; in a fresh process
``load_artifacts(path)`` before the first compile, and compiling hits Inductor's caches while every
tuned bucket is a tactic-cache hit: nothing is profiled.

The file is a zip archive:

- ``manifest.json``: format, version, the environment it was made under (flashtune, torch,
  triton, CUDA, GPU or CPU, timing mode: ``tuner.cache.environment``), counts, creation time;
- ``tactics.json``: the tactic cache document (``tuner/cache.py``'s format);
- ``inductor.bin``: ``torch.compiler.save_cache_artifacts()``'s bytes (absent when nothing was
  compiled by Inductor, e.g. with ``inner="eager"``).

Guarantees: ``load_artifacts`` checks the whole manifest and parses the tactics before it uses
anything; a file made under another environment, or damaged, raises ``ArtifactError`` (naming the
differing fields) and nothing of it is used. Nothing in the file is executed or unpickled by
flashtune; Inductor's bytes are handed to ``torch.compiler.load_cache_artifacts``, so load only
artifacts you made or trust, as with any compile cache.
"""

from __future__ import annotations

import json
import logging
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


class ArtifactError(CacheFileError):
    """An artifact file that cannot be used: unreadable, damaged, or made under another environment."""


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive holding a flashtune manifest (contents not checked)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "manifest.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _is_tactic_document(path: Path) -> bool:
    try:
        parse_document(json.loads(path.read_text()), str(path), None)
        return True
    except (OSError, ValueError, UnicodeDecodeError):  # JSONDecodeError and CacheFileError are ValueErrors
        return False


def save_artifacts(path: str | Path) -> dict[str, Any]:
    """Write every cached tactic and this process's Inductor compile artifacts to ``path`` (one
    file, replaced atomically). Returns counts: ``tactics``, ``inductor`` (artifacts) and ``bytes``."""
    path = Path(path)
    tuner = AutoTuner.get()
    entries = tuner.cache.snapshot()
    saved = torch.compiler.save_cache_artifacts()
    blob, inductor = (saved[0], sum(len(v) for v in saved[1].artifacts.values())) if saved else (b"", 0)
    manifest = {"kind": KIND, "version": VERSION, "env": tuner.cache.env, "created": time.time(),
                "tactics": len(entries), "inductor": inductor}

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            zf.writestr("tactics.json", json.dumps(to_document(tuner.cache.env, entries)))
            if blob:
                zf.writestr("inductor.bin", blob)

    atomic_write(path, write)
    size = path.stat().st_size
    log.info("flashtune: saved %d tactics and %d Inductor artifacts to %s (%d bytes)", len(entries), inductor,
             path, size)
    if not inductor:
        log.info("flashtune: no Inductor artifacts in this process (nothing compiled by Inductor yet, or "
                 "inner='eager'); %s holds tactics only", path)
    return {"tactics": len(entries), "inductor": inductor, "bytes": size}


def _read(path: Path) -> tuple[dict[str, Any], Any, bytes]:
    """(manifest, tactics document, Inductor bytes); ArtifactError if the archive is not one of ours."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "manifest.json" not in names or "tactics.json" not in names:
                raise ArtifactError(f"{path}: not a flashtune artifact file (a zip archive without a "
                                    f"flashtune manifest and tactics)")
            manifest = json.loads(zf.read("manifest.json"))
            doc = json.loads(zf.read("tactics.json"))
            blob = zf.read("inductor.bin") if "inductor.bin" in names else b""
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such artifact file") from None
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        if _is_tactic_document(path):
            raise ArtifactError(f"{path}: is a tactic cache document, not an artifact file; load it with "
                                f"ft.load_cache or `flashtune cache import`") from None
        raise ArtifactError(f"{path}: not a readable flashtune artifact file ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ArtifactError(f"{path}: not a flashtune artifact file (manifest kind {manifest!r:.80})")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('version')!r}; this flashtune "
                            f"reads version {VERSION}")
    return manifest, doc, blob


def load_artifacts(path: str | Path) -> dict[str, Any]:
    """Use an artifact file made by ``save_artifacts``: its Inductor artifacts go into Inductor's
    caches and its tactics into the tactic cache (written through to disk). Call it before the
    first compile. Raises ArtifactError, using nothing, if the file is damaged or was made under
    another environment. Returns counts: ``tactics`` and ``inductor``."""
    path = Path(path)
    tuner = AutoTuner.get()
    manifest, doc, blob = _read(path)
    here = tuner.cache.env
    if manifest.get("env") != here:
        diff = env_diff(manifest.get("env"), here)
        said = ", ".join(f"{k} {theirs!r} (here {ours!r})" for k, (theirs, ours) in diff.items())
        raise ArtifactError(f"{path}: made under another environment, so none of it is used: {said}. "
                            f"Make the artifact again on this machine and software (ft.warmup, then "
                            f"ft.save_artifacts).")
    try:
        entries = parse_document(doc, f"{path}:tactics.json", here)
    except CacheFileError as e:
        raise ArtifactError(str(e)) from None
    if tuner.stats.compiles:
        log.warning("flashtune: load_artifacts(%s) after %d graph(s) were compiled in this process: those "
                    "keep their compiled code; call it before the first compile", path, tuner.stats.compiles)
    inductor = 0
    if blob:
        try:
            info = torch.compiler.load_cache_artifacts(blob)
        except Exception as e:  # Inductor's own format check: the bytes are damaged or foreign
            raise ArtifactError(f"{path}: Inductor refused its compile artifacts "
                                f"({type(e).__name__}: {e}); nothing was loaded") from None
        inductor = sum(len(v) for v in info.artifacts.values()) if info else 0
    tuner.cache.merge_in(entries)
    log.info("flashtune: loaded %d tactics and %d Inductor artifacts from %s", len(entries), inductor, path)
    return {"tactics": len(entries), "inductor": inductor}
