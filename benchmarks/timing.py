"""The one timing rule of every benchmark ratio: interleaved repeats, medians, one warm-up of each side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def ratio(numerator: Callable[[], None], denominator: Callable[[], None], repeats: int) -> float:
    """median(numerator time) / median(denominator time), interleaved after one warm-up of each."""
    numerator(), denominator()
    top, bottom = [], []
    for _ in range(repeats):
        for fn, times in ((numerator, top), (denominator, bottom)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(top) / statistics.median(bottom)
