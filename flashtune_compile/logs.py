"""Logging: everything flashtune says goes through ``logging.getLogger("flashtune")``.

Without configuration, Python shows its warnings on stderr and hides the rest. ``FLASHTUNE_LOG``
(info, debug, warning or error) sets the logger's level and gives it its own stderr handler, so
``FLASHTUNE_LOG=info`` shows each bucket tuned and each graph routed, and ``debug`` adds every
candidate's timing, every cache hit of a new size and every node the passes left alone.
"""

from __future__ import annotations

import logging
import os

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_from_env() -> None:
    """Apply ``$FLASHTUNE_LOG`` (unset or empty: leave logging alone). ValueError naming the valid
    levels for any other value. Calling it again does not add a second handler."""
    value = os.environ.get("FLASHTUNE_LOG", "").strip().lower()
    if not value:
        return
    if value not in LEVELS:
        raise ValueError(f"FLASHTUNE_LOG={value!r} is not a log level; use one of {sorted(LEVELS)}")
    logger = logging.getLogger("flashtune")
    logger.setLevel(LEVELS[value])
    if not any(getattr(h, "flashtune_env", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler.flashtune_env = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False  # our handler prints it; the root's would print it twice
