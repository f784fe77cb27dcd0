"""How many CPU cores and torch threads this process may use, read in one place (no torch import:
the book build reads it before any kernel starts).

`available()` is the cores the process may run on (its CPU affinity, else the machine's count);
`omp_threads()` is $OMP_NUM_THREADS when it is a whole number >= 1 (what torch reads at import),
else None.
"""

from __future__ import annotations

import os


def available() -> int:
    """Cores this process may run on (>= 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def omp_threads() -> int | None:
    """$OMP_NUM_THREADS as a whole number >= 1, or None when unset or not such a number."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None
