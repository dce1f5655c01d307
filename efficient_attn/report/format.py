"""Numbers as short text for tables, legends and axes: lengths (``16K``), bytes (``19.7 GB``), times, SI rates.

Shared by the analyses (table cells) and the plots (tick labels), so a number reads the same in both.
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_ms", "format_si", "format_x", "length_label"]


def length_label(n: float) -> str:
    """``1024 -> "1K"``, ``16384 -> "16K"``, ``1048576 -> "1M"``, ``300 -> "300"``."""
    n = int(round(n))
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def format_si(value: float, unit: str) -> str:
    """``2.5e9, "FLOP/s" -> "2.5 GFLOP/s"``; without a unit ``"2.5G"``."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:g} {prefix}{unit}" if unit else f"{value / factor:g}{prefix}"
    return f"{value:g} {unit}".rstrip()


def format_bytes(value: float) -> str:
    """Decimal units, as the papers report them: ``9.48e9 -> "9.48 GB"``."""
    for factor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.0f} B"


def format_ms(value: float) -> str:
    """Milliseconds as ``"250 µs"``, ``"12 ms"``, ``"1.5 s"``."""
    if value < 1:
        return f"{value * 1e3:.3g} µs"
    if value < 1000:
        return f"{value:.3g} ms"
    return f"{value / 1e3:.3g} s"


def format_x(value: float) -> str:
    """A ratio as an axis label: ``2 -> "2x"``."""
    return f"{value:g}x"
