"""The measure the rate limiter's guarantee is stated in: the most requests in any sliding window."""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def busiest_window(times: Iterable[float], window_s: float = 60.0) -> int:
    """The most of `times` (unix seconds) in any closed window [t, t + window_s], as a per-minute
    budget counts them (window_s=60)."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_right(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0
    )
