"""Human-readable numbers: 1.2B, 4.4 TB, 3.1 days, $10.43M."""

from __future__ import annotations

import math


def si(value: float, unit: str = "", digits: int = 1) -> str:
    """1.23e9 -> '1.2 GB' with a unit, '1.2B' for a bare count (billions, as models are sized)."""
    if value is None or math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    giga = "G" if unit else "B"
    space = " " if unit else ""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, giga), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}f}{space}{prefix}{unit}"
    return f"{value:.{digits}f}{space}{unit}"


def duration(seconds: float) -> str:
    if math.isinf(seconds):
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def money(usd: float) -> str:
    return "$" + si(usd, digits=2) if usd >= 1e3 else f"${usd:.2f}"  # $10.43M, $3.00B
