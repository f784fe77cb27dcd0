"""What a chapter hands to the rendered book: glued numbers and results files.

`glue_text(name, value, fmt)` glues a number as formatted markdown, so the prose shows "54%" and
not "0.5432" or "'54%'": write {glue:md}`name` in the text. Results files are written to a
temporary file and renamed, so a chapter killed mid-run leaves the previous file or none.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def progress(iterable, desc: str = "", total: int | None = None, enabled: bool = True, **kw):
    """A tqdm progress bar, off when `enabled` is False or TQDM_DISABLE is set (the book build sets
    it: progress bars are for readers who rerun a chapter, not for the rendered page)."""
    from tqdm.auto import tqdm

    off = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(iterable, desc=desc, total=total, disable=off, leave=False, **kw)


def fmt(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) if spec else str(value)


def glue_text(name: str, value, spec: str = "") -> str:
    """Glue `value` formatted with `spec` as inline markdown under `name`."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(fmt(value, spec)), display=False)


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write JSON to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True, default=float)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
