"""Progress bars for long loops (tqdm), off in the built book."""

from __future__ import annotations

import os


def progress(iterable, desc: str = "", total: int | None = None, enabled: bool = True, **kw):
    """A tqdm progress bar, off when `enabled` is False or TQDM_DISABLE is set (the book build sets
    it: progress bars are for readers who rerun a chapter, not for the rendered page)."""
    import warnings

    off = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    if off:  # the plain tqdm: tqdm.auto would warn into the page when ipywidgets is missing
        from tqdm import tqdm
    else:
        from tqdm import TqdmWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TqdmWarning)  # no ipywidgets: a text bar is fine
            from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=off, leave=False, **kw)
