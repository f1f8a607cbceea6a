"""How much memory the machine can give weight copies, and the user's own cap on it
(``$FLASHTUNE_WEIGHT_CACHE_MB``): the two inputs of ``WeightCache``'s budget (``tuner/weights.py``)."""

from __future__ import annotations

import os

MIN_RESERVE = 512 * 2**20  # memory never taken by copies: this, or 5% of the machine's, whichever is more


def size_text(n: int) -> str:
    """``n`` bytes as a person reads them: bytes, KiB, MiB or GiB."""
    if n < 2**10:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def available_bytes() -> int | None:
    """Memory the machine can still give (Linux's MemAvailable) less a reserve of 5% of its memory
    (at least 512 MiB); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        avail = int(fields["MemAvailable"].split()[0]) * 1024
        total = int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return avail - max(MIN_RESERVE, total // 20)


def max_bytes_from_env() -> int | None:
    """``$FLASHTUNE_WEIGHT_CACHE_MB`` in bytes; None when unset or ``auto`` (the default budget);
    ValueError naming it if malformed."""
    text = os.environ.get("FLASHTUNE_WEIGHT_CACHE_MB", "").strip()
    if text in ("", "auto"):
        return None
    try:
        mb = int(text)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"FLASHTUNE_WEIGHT_CACHE_MB={text!r} is not a non-negative whole number of MiB (or 'auto')")
    return mb * 2**20
