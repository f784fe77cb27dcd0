"""What a chapter hands to the rendered book: glued numbers and results files.

`glue_text(name, value, fmt)` glues a number as formatted markdown, so the prose shows "54%" and
not "0.5432" or "'54%'": write {glue:md}`name` in the text. Results files are written to a
temporary file and renamed, so a chapter killed mid-run leaves the previous file or none.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


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


def fmt(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) if spec else str(value)


_GLUED: dict = {}


def glue_text(name: str, value, spec: str = "") -> str:
    """Glue `value` formatted with `spec` as inline markdown under `name` (and remember the raw
    value, for `save_glued`)."""
    from IPython.display import Markdown
    from myst_nb import glue

    _GLUED[name] = value
    glue(name, Markdown(fmt(value, spec)), display=False)


def glue(name: str, value, display: bool = False) -> None:
    """myst_nb's glue, remembering numbers, strings and markdown text for `save_glued`."""
    import numbers

    from myst_nb import glue as nb_glue

    if isinstance(value, (numbers.Number, str)) or value is None:
        _GLUED[name] = value
    elif type(value).__name__ == "Markdown":
        _GLUED[name] = value.data
    nb_glue(name, value, display=display)


def glued() -> dict:
    """Every raw value glued with `glue_text` so far in this process, by glue name."""
    return dict(_GLUED)


def save_glued(chapter: str, params: dict, model_names, extra: dict | None = None) -> list[Path]:
    """One results file per model (`save_results`) holding every number the chapter's prose shows
    (`glued()`) and `extra`; the model file hash comes from the registry (None for hub ids)."""
    from types import SimpleNamespace

    from .models import REGISTRY

    data = {"glued": glued(), **(extra or {})}
    paths = []
    for name in model_names:
        spec = REGISTRY.get(name)
        holder = SimpleNamespace(file_sha256=spec.sha256 if spec else None)
        paths.append(save_results(chapter, name, params, data, model=holder))
    return paths


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write JSON to `path` through a temporary file in `<folder>/.partial/` and a rename."""
    text = json.dumps(data, indent=1, sort_keys=True, default=float) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Results files: deterministic, atomic, and free of secrets

SECRET_WORDS = ("key", "token", "secret", "password")
SIGNIFICANT_DIGITS = 10


def results_path(chapter: str, model_name: str) -> Path:
    """`_build/results/<chapter>-<model>.json`; the folder is $CATCHTAG_RESULTS when set, else
    $CATCHTAG_BUILD/results when that is set. A hub id's "/" becomes "--"."""
    folder = os.environ.get("CATCHTAG_RESULTS")
    if folder:
        base = Path(folder)
    elif os.environ.get("CATCHTAG_BUILD"):  # the book build's folder, moved (see bookbuild)
        base = Path(os.environ["CATCHTAG_BUILD"]) / "results"
    else:
        root = Path(__file__).resolve().parents[2]
        base = (root if (root / "pyproject.toml").exists() else Path.cwd()) / "_build" / "results"
    safe = str(model_name).strip().replace("/", "--").replace("\\", "--") or "none"
    return base / f"{chapter}-{safe}.json"


def library_sha256() -> str:
    """sha256 over the library's Python sources (relative path and bytes, in sorted order)."""
    import hashlib

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if k == "NDIF_API_KEY" and v and len(v) >= 4]


def public_params(params: dict) -> dict:
    """The parameters without any whose name contains key, token, secret or password, and without
    any whose value is the NDIF API key."""
    secrets = _secret_values()
    return {
        k: v for k, v in params.items()
        if not any(w in str(k).lower() for w in SECRET_WORDS) and not (isinstance(v, str) and v in secrets)
    }


def plain(value, digits: int = SIGNIFICANT_DIGITS):
    """`value` as plain JSON data, floats rounded to `digits` significant digits, NaN and inf as
    None: numpy and torch arrays become (nested) lists, DataFrames lists of row dicts, Series and
    dicts dicts with string keys, tuples and sets lists (sets sorted)."""
    import numbers

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            return None
        return float(f"{x:.{digits}g}") if x else 0.0
    if isinstance(value, dict):
        return {str(k): plain(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, digits) for v in value]
    if isinstance(value, (set, frozenset)):
        return [plain(v, digits) for v in sorted(value, key=repr)]
    module = type(value).__module__.split(".")[0]
    if module == "torch":
        return plain(value.detach().cpu().tolist(), digits)
    if module == "numpy":
        return plain(value.tolist(), digits)
    if module == "pandas":
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            return plain(value.to_dict(orient="records"), digits)
        if isinstance(value, pd.Series):
            return plain(value.to_dict(), digits)
        if isinstance(value, pd.Index):
            return plain(value.tolist(), digits)
    if dataclass_fields := getattr(value, "__dataclass_fields__", None):
        return {k: plain(getattr(value, k), digits) for k in dataclass_fields}
    raise TypeError(f"cannot store a {type(value).__name__} in a results file")


def results_json(chapter: str, model_name: str, params: dict, data, model=None) -> str:
    """The text of a results file: the same inputs give the same bytes (sorted keys, rounded
    floats, no timestamps, no paths)."""
    from . import __version__
    from .errors import CatchtagError

    record = {
        "chapter": chapter,
        "model": model_name,
        "model_file_sha256": getattr(model, "file_sha256", None),
        "parameters": plain(public_params(dict(params))),
        "library": {"version": __version__, "source_sha256": library_sha256()},
        "data": plain(data),
    }
    text = json.dumps(record, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    for secret in _secret_values():
        if secret in text:
            raise CatchtagError(
                f"results of {chapter!r} for {model_name!r} contain the NDIF API key; nothing was "
                "written: pass the key only through the environment, never as data"
            )
    return text


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    """Write `payload` to `path` so that `path` is always either its previous complete content or
    the new one: the bytes go to `<folder>/.partial/<name>.<pid>.tmp` (same file system), are
    flushed to disk, and the file is renamed over `path`. A writer killed mid-way leaves its
    temporary file in `.partial/`, never at `path`; the next write to the folder removes it."""
    path = Path(path)
    staging = path.parent / ".partial"
    staging.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(staging)
    tmp = staging / f"{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_partials(staging: Path) -> list[Path]:
    """Delete `<name>.<pid>.<suffix>` files in `staging` whose writing process is gone."""
    removed = []
    for tmp in Path(staging).glob("*.*.*"):
        parts = tmp.name.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and not _alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def save_results(chapter: str, model_name: str, params: dict, data, model=None) -> Path:
    """Write `_build/results/<chapter>-<model>.json` (folder: $CATCHTAG_RESULTS) atomically.

    The file holds the chapter, the model name, the model file's sha256 (`model.file_sha256`, None
    for hub ids), the parameters (without secrets: see `public_params`), the library version and a
    hash of its source, and `data` (see `plain`). It is byte-identical for the same inputs.
    """
    text = results_json(chapter, model_name, params, data, model)
    return write_bytes_atomic(results_path(chapter, model_name), text.encode("utf-8"))
