"""The tactic cache: winners in memory, written through to one JSON document per environment.

Guarantees: nothing read from a file is executed, unpickled or eval'd (JSON only, every field
type-checked); an entry naming a runner outside its key's runner set, or an ill-typed tactic, is
dropped with a warning; a truncated, corrupt or foreign file is renamed aside with one warning;
every new winner is merged with what other processes wrote and written with an atomic replace
under a file lock, so concurrent writers lose nothing. Failing to write (read-only disk, lock held
too long) costs persistence, never the program.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import filelock
import torch

from .runner import Tactic, canonical_tactic

log = logging.getLogger("flashtune")

FORMAT = 1
Key = tuple  # (op, runner names, static key, extras, bucket)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(timing_mode: str) -> dict[str, Any]:
    """What a timing depends on. Entries measured under another environment are never used."""
    from .. import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "flashtune": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "cpu": f"{_cpu_name()} x{torch.get_num_threads()} threads",
        "timing": timing_mode,
    }


def default_cache_dir() -> Path:
    """The platform's user cache dir for flashtune (e.g. ~/.cache/flashtune on Linux). Without
    platformdirs installed (e.g. a GPU box set up with ``pip install --no-deps``), the XDG rule:
    $XDG_CACHE_HOME/flashtune, else ~/.cache/flashtune."""
    try:
        import platformdirs
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashtune"
    return Path(platformdirs.user_cache_dir("flashtune"))


def resolve_dir(directory: Path | str | None) -> Path | None:
    """A cache directory as one path names it everywhere (absolute, ``~`` expanded); None stays None."""
    return Path(directory).expanduser().resolve() if directory is not None else None


def env_id(env: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


def freeze(value: Any) -> Any:
    """JSON-able value -> hashable value (lists become tuples). TypeError for anything else."""
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


@dataclass
class Entry:
    """The winner of one bucket."""

    runner: str
    tactic: Tactic
    time_s: float
    default_s: float
    created: float = field(default_factory=time.time)
    timed: int = 0
    rejected: list[str] = field(default_factory=list)
    tune_s: float = 0.0  # wall seconds this bucket took to tune (synthesis, compiles, checks, timings)
    # Where the winner reads a weight copy: the fastest candidate that needs none ("": the default),
    # run for a weight whose copy the weight cache refuses (tuner/weights.py), and its time.
    fallback_runner: str = ""
    fallback_tactic: Tactic = -1
    fallback_s: float = 0.0

    @property
    def speedup(self) -> float:
        return self.default_s / self.time_s if self.time_s > 0 else 1.0


def _entry_to_json(key: Key, entry: Entry) -> dict[str, Any]:
    op, runners, static, extras, bucket = key
    return {
        "op": op,
        "runners": list(runners),
        "static": static,
        "extras": extras,
        "bucket": list(bucket),
        **asdict(entry),
    }


def _entry_from_json(obj: Any) -> tuple[Key, Entry]:
    """Parse one stored entry; ValueError/TypeError says why it is unusable."""
    if not isinstance(obj, dict):
        raise TypeError("entry is not an object")
    op, runners, runner = obj.get("op"), obj.get("runners"), obj.get("runner")
    if not isinstance(op, str) or not isinstance(runners, list) or not all(isinstance(r, str) for r in runners):
        raise TypeError("op/runners are not strings")
    if runner not in runners:
        raise ValueError(f"names unknown runner {runner!r} (runner set {runners})")
    bucket = obj.get("bucket")
    if not isinstance(bucket, list) or not all(type(b) is int for b in bucket):
        raise TypeError("bucket is not a list of ints")
    tactic = canonical_tactic(obj.get("tactic"))
    times = [obj.get("time_s"), obj.get("default_s"), obj.get("created", 0.0)]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
        raise TypeError("times are not numbers")
    rejected = obj.get("rejected", [])
    if not isinstance(rejected, list) or not all(isinstance(r, str) for r in rejected):
        raise TypeError("rejected is not a list of strings")
    timed, tune_s = obj.get("timed", 0), obj.get("tune_s", 0.0)
    key = (op, tuple(runners), freeze(obj.get("static")), freeze(obj.get("extras")), tuple(bucket))
    entry = Entry(
        runner,
        tactic,
        float(times[0]),
        float(times[1]),
        float(times[2]),
        timed if type(timed) is int else 0,
        rejected,
        float(tune_s) if isinstance(tune_s, (int, float)) and not isinstance(tune_s, bool) else 0.0,
    )
    fallback, fb_s = obj.get("fallback_runner", ""), obj.get("fallback_s", 0.0)
    if fallback in runners and isinstance(fb_s, (int, float)) and not isinstance(fb_s, bool):  # else: the default
        try:
            entry.fallback_tactic = canonical_tactic(obj.get("fallback_tactic", -1))
            entry.fallback_runner, entry.fallback_s = fallback, float(fb_s)
        except TypeError:
            pass
    return key, entry


class CacheFileError(ValueError):
    """A cache document that cannot be used: unreadable, malformed, or from another environment (the
    message says which). Raised by ``load_cache`` and ``flashtune cache import``; a ValueError.

    Example::

        try:
            ft.load_cache("tactics.json")
        except ft.CacheFileError as e:
            print("not loaded:", e)
    """


def read_document(path: Path, env: dict[str, Any] | None) -> dict[Key, Entry]:
    """Entries of a cache document. Raises CacheFileError if the file is not a valid document or
    (when ``env`` is given) was made under another environment; drops bad entries with a warning."""
    return parse_document(read_json(path), str(path), env)


def read_json(path: Path) -> Any:
    """The parsed JSON in ``path``; CacheFileError if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFileError(f"{path}: not a readable JSON document ({e})") from None


def env_diff(theirs: Any, ours: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields where environment ``theirs`` differs from ``ours``, as {field: (theirs, ours)}."""
    theirs = theirs if isinstance(theirs, dict) else {}
    return {k: (theirs.get(k), ours.get(k)) for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k)}


def parse_document(doc: Any, source: str, env: dict[str, Any] | None) -> dict[Key, Entry]:
    """Entries of a parsed cache document (``source`` names it in errors); see ``read_document``."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
        raise CacheFileError(f"{source}: not a flashtune tactic cache (format {FORMAT})")
    if env is not None and doc.get("env") != env:
        raise CacheFileError(
            f"{source}: made under another environment; differs in (file, here): {env_diff(doc.get('env'), env)}"
        )
    out: dict[Key, Entry] = {}
    for i, obj in enumerate(doc["entries"]):
        try:
            key, entry = _entry_from_json(obj)
        except (TypeError, ValueError) as e:
            log.warning("flashtune cache %s: dropping entry %d: %s", source, i, e)
            continue
        out[key] = entry
    return out


def to_document(env: dict[str, Any], entries: dict[Key, Entry]) -> dict[str, Any]:
    """The JSON document holding ``entries`` measured under ``env``."""
    return {"format": FORMAT, "env": env, "entries": [_entry_to_json(k, e) for k, e in entries.items()]}


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write`` writes to a binary file: readers see the old file or
    the whole new one, never a part; on any error the old file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
    # Mode 0o666 less the umask, as open() makes files (mkstemp's would be owner-only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_document(path: Path, env: dict[str, Any], entries: dict[Key, Entry]) -> None:
    """Atomically replace ``path`` with a document holding ``entries``."""
    text = json.dumps(to_document(env, entries), indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def merge(into: dict[Key, Entry], other: dict[Key, Entry]) -> bool:
    """Merge ``other`` into ``into``; on a shared key the newer entry wins. True if ``into`` changed."""
    changed = False
    for key, entry in other.items():
        mine = into.get(key)
        if mine is None or (entry.created > mine.created and entry != mine):
            into[key] = entry
            changed = True
    return changed


class TacticCache:
    """Winners by key, loaded lazily from ``directory`` and written through to it.

    ``directory=None`` keeps everything in memory. ``on_change`` is called after any change to the
    entries, so callers can drop memoized choices.
    """

    LOCK_TIMEOUT_S = 30.0

    def __init__(
        self, directory: Path | str | None, env: dict[str, Any], on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.env = env
        self.entries: dict[Key, Entry] = {}
        self._loaded = self.directory is None
        self._lock = threading.RLock()
        self._on_change = on_change
        self._write_failed = False
        self._dropped: dict[Key, float] = {}  # dropped key -> created time of what was dropped

    def _merge(self, incoming: dict[Key, Entry]) -> bool:
        """Merge ``incoming`` into memory (newer wins), except entries this cache dropped and that
        are no newer than what it dropped. True if memory changed."""
        if self._dropped:
            incoming = {k: e for k, e in incoming.items() if e.created > self._dropped.get(k, -1.0)}
        return merge(self.entries, incoming)

    @property
    def path(self) -> Path | None:
        return self.directory / f"tactics-{env_id(self.env)}.json" if self.directory else None

    def get(self, key: Key) -> Entry | None:
        if not self._loaded:
            self._load_disk()
        return self.entries.get(key)

    def _file_lock(self) -> filelock.FileLock:
        assert self.path is not None
        return filelock.FileLock(str(self.path) + ".lock", timeout=self.LOCK_TIMEOUT_S)

    def _read_own(self) -> dict[Key, Entry]:
        """This environment's file, or {} if absent; a bad file is set aside (call under the lock)."""
        path = self.path
        if path is None or not path.exists():
            return {}
        try:
            return read_document(path, self.env)
        except CacheFileError as e:
            aside = path.with_name(f"{path.name}.bad-{int(time.time())}")
            try:
                os.replace(path, aside)
                log.warning("flashtune: set aside unusable tactic cache as %s: %s", aside, e)
            except OSError:
                log.warning("flashtune: ignoring unusable tactic cache: %s", e)
            return {}

    def _load_disk(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                with self._file_lock():
                    disk = self._read_own()
            except (OSError, filelock.Timeout) as e:
                log.warning(
                    "flashtune: cannot read the tactic cache in %s (%s); tuning in memory only", self.directory, e
                )
                return
            if self._merge(disk):
                self._on_change()

    def _write_through(self) -> None:
        """Merge other processes' entries into memory and write all to disk (call under the lock).
        A failure costs persistence only, and is said once."""
        if self.path is None:
            return
        try:
            with self._file_lock():
                self._merge(self._read_own())
                write_document(self.path, self.env, self.entries)
        except (OSError, filelock.Timeout) as e:
            if not self._write_failed:
                log.warning("flashtune: cannot write the tactic cache %s (%s); keeping winners in memory", self.path, e)
                self._write_failed = True

    def put(self, key: Key, entry: Entry) -> None:
        """Record a winner and write it through (merging with other processes' entries)."""
        with self._lock:
            self.entries[key] = entry
            self._write_through()
        self._on_change()

    def drop(self, key: Key) -> None:
        """Forget the entry at ``key`` and write that through: it is gone from disk too, and an
        entry no newer than it, merged from disk later (another process's copy), is not taken back."""
        with self._lock:
            if not self._loaded:
                self._load_disk()
            entry = self.entries.pop(key, None)
            if entry is None:
                return
            self._dropped[key] = entry.created
            self._write_through()
        self._on_change()

    def snapshot(self) -> dict[Key, Entry]:
        """A copy of every entry, including what is on disk."""
        with self._lock:
            if not self._loaded:
                self._load_disk()
            return dict(self.entries)

    def save(self, path: Path | str) -> int:
        """Write every entry to ``path`` (one document); returns how many."""
        entries = self.snapshot()
        write_document(Path(path), self.env, entries)
        return len(entries)

    def load(self, path: Path | str) -> int:
        """Merge a document saved by ``save`` into memory (and write it through). CacheFileError if
        it is unreadable or from another environment. Returns how many entries it held."""
        return self.merge_in(read_document(Path(path), self.env))

    def merge_in(self, incoming: dict[Key, Entry]) -> int:
        """Merge entries measured under this cache's environment (newer wins), writing them
        through; returns how many were given."""
        with self._lock:
            if not self._loaded:
                self._load_disk()
            changed = merge(self.entries, incoming)
            if incoming:
                self._write_through()
        if changed:
            self._on_change()
        return len(incoming)

    def clear(self, disk: bool = True) -> None:
        """Forget every entry, and with ``disk`` delete this environment's file too."""
        with self._lock:
            self.entries.clear()
            self._loaded = self.directory is None or disk
            if disk and self.path is not None:
                try:
                    with self._file_lock():
                        self.path.unlink(missing_ok=True)
                except (OSError, filelock.Timeout) as e:
                    log.warning("flashtune: cannot delete the tactic cache %s (%s)", self.path, e)
        self._on_change()
