"""Latency histograms: HdrHistogram when the `hdrhistogram` package is installed, else our own.

Values are recorded in microseconds (1 us .. 60 s). `LatencyHistogram` has one interface with
two backends:

- `hdrh.histogram.HdrHistogram(1, 60_000_000, 3)`: 3 significant digits, i.e. any recorded
  value is reported within 0.1 % (the `loadtest` extra installs it).
- `LogHistogram`, the fallback: log-spaced buckets with ratio 2**(1/128) between edges, so a
  reported percentile is within 0.55 % of the true value (the bucket's geometric midpoint is
  reported); values below 1 us count as 1 us, values above 60 s as 60 s.

Both are mergeable (one histogram per load-generator worker, merged at the end) and report
percentiles in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Protocol

MIN_US = 1
MAX_US = 60_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class _Backend(Protocol):
    def record_value(self, value: int) -> Any: ...
    def get_total_count(self) -> int: ...
    def get_value_at_percentile(self, percentile: float) -> int | float: ...
    def get_max_value(self) -> int | float: ...
    def get_min_value(self) -> int | float: ...
    def get_mean_value(self) -> float: ...


class LogHistogram:
    """Log-bucketed histogram (fallback backend); relative error <= 0.55 % per value."""

    STEPS_PER_OCTAVE = 128

    def __init__(self) -> None:
        self._scale = self.STEPS_PER_OCTAVE / math.log(2.0)
        self._nbuckets = int(math.log(MAX_US) * self._scale) + 2
        self._counts = [0] * self._nbuckets
        self._total = 0
        self._sum = 0
        self._min = MAX_US
        self._max = 0

    def _index(self, value: int) -> int:
        return int(math.log(value) * self._scale)

    def _midpoint(self, index: int) -> float:
        return math.exp((index + 0.5) / self._scale)

    def record_value(self, value: int) -> bool:
        value = min(max(value, MIN_US), MAX_US)
        self._counts[self._index(value)] += 1
        self._total += 1
        self._sum += value
        self._min = min(self._min, value)
        self._max = max(self._max, value)
        return True

    def get_total_count(self) -> int:
        return self._total

    def get_value_at_percentile(self, percentile: float) -> float:
        if self._total == 0:
            return 0.0
        target = max(1, math.ceil(self._total * percentile / 100.0))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= target:
                return min(max(self._midpoint(index), self._min), self._max)
        return float(self._max)

    def get_max_value(self) -> int:
        return self._max

    def get_min_value(self) -> int:
        return self._min if self._total else 0

    def get_mean_value(self) -> float:
        return self._sum / self._total if self._total else 0.0

    def add(self, other: LogHistogram) -> None:
        for index, count in enumerate(other._counts):
            self._counts[index] += count
        self._total += other._total
        self._sum += other._sum
        if other._total:
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)


def _new_backend(prefer_hdr: bool = True) -> tuple[_Backend, str]:
    if prefer_hdr:
        try:
            from hdrh.histogram import HdrHistogram
        except ImportError:
            pass
        else:
            return HdrHistogram(MIN_US, MAX_US, 3), "hdrhistogram(3 significant digits)"
    return LogHistogram(), "log-buckets(2^(1/128), <=0.55% error)"


class LatencyHistogram:
    """Records latencies (seconds in, microseconds stored); reports milliseconds."""

    def __init__(self, prefer_hdr: bool = True) -> None:
        self._h, self.backend = _new_backend(prefer_hdr)

    def record(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        self._h.record_value(MIN_US if us < MIN_US else MAX_US if us > MAX_US else us)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        if self.count == 0:
            return 0.0
        return float(self._h.get_value_at_percentile(percentile)) / 1000.0

    def merge(self, other: LatencyHistogram) -> None:
        if type(self._h) is not type(other._h):
            raise TypeError("cannot merge histograms with different backends")
        self._h.add(other._h)  # type: ignore[attr-defined]

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def summary(self) -> dict[str, float | int]:
        """count, mean/min/max and p50/p90/p99/p99.9 in milliseconds."""
        n = self.count
        out: dict[str, float | int] = {"count": n}
        out["mean_ms"] = round(self._h.get_mean_value() / 1000.0, 4) if n else 0.0
        out["min_ms"] = round(float(self._h.get_min_value()) / 1000.0, 4) if n else 0.0
        out["max_ms"] = round(float(self._h.get_max_value()) / 1000.0, 4) if n else 0.0
        for p in PERCENTILES:
            out[f"p{p:g}_ms".replace(".", "")] = round(self.percentile_ms(p), 4)
        return out

    def curve(self) -> list[tuple[float, float]]:
        """(percentile, ms) points for a latency-by-percentile plot (log-spaced to p99.99)."""
        if self.count == 0:
            return []
        points = []
        for k in range(0, 41):
            # 0, 43.8, 68.4, 82.2, 90, ... -> approaches 100 geometrically (1 - 10^-(k/10))
            p = 100.0 * (1.0 - 10 ** (-k / 10.0))
            points.append((round(p, 4), round(self.percentile_ms(min(p, 99.99)), 4)))
        return points
