"""Build a kernel extension once per process: thread-safe, memoized, a failure remembered.

``torch.utils.cpp_extension`` (``load``, ``load_inline``) caches each build on disk (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``) under its name, so callers name a build by a hash of
everything that changes the binary (``build_name``): each machine compiles a given version once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("flashtune")


def build_name(prefix: str, *parts: str) -> str:
    """``<prefix>_<hash of parts>``: a new name, hence a new build, whenever any part changes."""
    return f"{prefix}_{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:12]}"


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
