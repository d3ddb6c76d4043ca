"""Sizes as the configuration writes them and as reasons show them: ``min_free``
(a share of a filesystem, or bytes) and bytes in human units."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class MinFree:
    """How much of a node's image filesystem must stay free: a share of it, or bytes."""

    percent: float | None = None
    size: int | None = None

    @classmethod
    def parse(cls, value: object) -> MinFree:
        """``"20%"``, ``"50GiB"``, ``"500 MB"`` or a number of bytes; ValueError says what is wrong."""
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{value!r} is not a size: write a percentage such as \"20%\" or bytes such as \"50GiB\"")
        text = str(value).strip().lower()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ValueError(f"{value!r} is not a percentage: write it such as \"20%\"") from None
            if not 0 <= percent < 100:
                raise ValueError(f"{value!r} is out of range: use 0% to 99%")
            return cls(percent=percent)
        match = _SIZE.fullmatch(text)
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"{value!r} is not a size: write a percentage such as \"20%\" or bytes such as "
                             "\"50GiB\" (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        return cls(size=int(float(match.group(1)) * _UNITS[match.group(2)]))

    def bytes_of(self, total: int) -> int:
        """The bytes to keep free on a filesystem of ``total`` bytes."""
        if self.percent is not None:
            return int(total * self.percent / 100)
        return self.size or 0

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        return human(self.size or 0)


def human(size: float) -> str:
    """``3.0 MiB``: bytes as the figures in a reason show them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
