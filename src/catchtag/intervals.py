"""Confidence intervals shared by the chapters' library modules.

`t_interval` is the Student-t interval of a mean (kvcache: over chunks; probes: over splits).
"""

from __future__ import annotations

import math

import numpy as np


def t_interval(x, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the Student-t interval (n - 1 degrees of freedom) of the mean of x, a 1-D
    sequence of numbers; NaN bounds for fewer than 2 values (one value has no spread to show), NaN
    throughout for none. NaN values are not dropped here (see `probes.mean_interval`)."""
    from scipy import stats

    x = np.asarray(x, dtype=float)
    m = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h
