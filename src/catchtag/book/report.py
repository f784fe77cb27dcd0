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

from ..progress import progress  # noqa: F401  (chapters import it from here too)


def fmt(value, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec) if spec else str(value)


def glue_text(name: str, value, spec: str = "") -> None:
    """Glue `value` formatted with `spec` as inline markdown under `name` (shown with
    {glue:md}`name`); `Results.put` calls it for every quantity."""
    from myst_nb import glue

    glue(name, markdown(fmt(value, spec)), display=False)


def markdown(text: str):
    """IPython's Markdown holding `text` as it is. Markdown(text) itself reads `text` as a file name
    when a file or folder of that name exists (a model given as a local folder path would be
    read, or fail as a directory), so the text is set after construction."""
    from IPython.display import Markdown

    md = Markdown("")
    md.data = text
    return md


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
        root = Path(__file__).resolve().parents[3]
        base = (root if (root / "pyproject.toml").exists() else Path.cwd()) / "_build" / "results"
    safe = str(model_name).strip().replace("/", "--").replace("\\", "--") or "none"
    return base / f"{chapter}-{safe}.json"


def library_sha256() -> str:
    """sha256 over the library's Python sources (relative path and bytes, in sorted order)."""
    import hashlib

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if k == "NDIF_API_KEY" and v and len(v) >= 4]


def _secret_name(name) -> bool:
    """True when a part of the name (split at "_" or "-") is, or ends with, key, token, secret or
    password (`api_key`, `hf_token`, `apikey`), not when a word merely contains one
    (`chunk_tokens` is a length, not a secret)."""
    parts = str(name).lower().replace("-", "_").split("_")
    return any(p.endswith(w) for p in parts for w in SECRET_WORDS)


def public_params(params: dict) -> dict:
    """The parameters without any whose name names a secret (`_secret_name`), and without any whose
    value is the NDIF API key."""
    secrets = _secret_values()
    return {
        k: v for k, v in params.items()
        if not _secret_name(k) and not (isinstance(v, str) and v in secrets)
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
    from .. import __version__
    from ..errors import CatchtagError

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


# --------------------------------------------------------------------------------------------------
# One results object per chapter run

SLOTS = ("m1", "m2")  # the chapter's `model` and `compare` parameters, in every chapter


class Results:
    """Every number one chapter run shows, under one name, glued and written once.

    `Results(chapter, params, [model, compare])` with model names (or loaded `Model`s); an empty
    name ("") is an absent second model. Slots are "m1" (the `model` parameter) and "m2"
    (`compare`) in every chapter.

    - `put(model, quantity, value, spec="")` keeps the raw value and glues it, formatted with
      `spec`, as `{chapter}_{slot}_{quantity}` (write {glue:md}`sinks_m1_first_share` in the prose);
      `put(None, quantity, ...)` is a chapter-level number, glued as `{chapter}_{quantity}`.
    - `done()` glues "n/a" for every quantity the first model has and an absent second model does
      not, glues the run time as `{chapter}_seconds`, and writes the results files (see `save`).

    The model's display name is glued as `{chapter}_{slot}_model` at construction. Values are
    numbers, strings, None or anything `plain` stores (arrays, DataFrames, dicts).
    """

    def __init__(self, chapter: str, params: dict, models):
        import time

        self.chapter = chapter
        self.params = dict(params)
        self.started = time.time()
        names = [m if isinstance(m, str) or m is None else m.name for m in models]
        names = [(n or "") for n in names] + [""] * (len(SLOTS) - len(names))
        if not names[0]:
            raise ValueError("Results needs at least the first model's name")
        self.names = dict(zip(SLOTS, names[: len(SLOTS)]))
        self._models = {m.name: m for m in models if m is not None and not isinstance(m, str)}
        self.values: dict[str, dict] = {slot: {} for slot in SLOTS}
        self.shared: dict = {}
        for slot, name in self.names.items():
            if name:
                self.put(name, "model", self._title(name))

    @staticmethod
    def _title(name: str) -> str:
        from ..models import REGISTRY

        spec = REGISTRY.get(name)
        return spec.title if spec else name

    def slot(self, model) -> str:
        """'m1' or 'm2' for a model name (or loaded `Model`) of this run."""
        name = model if isinstance(model, str) else model.name
        for slot, n in self.names.items():
            if n and n == name:
                return slot
        if name in SLOTS:
            return name
        raise ValueError(f"{name!r} is not a model of this run ({', '.join(n for n in self.names.values() if n)})")

    def name(self, model, quantity: str) -> str:
        """The glue name of a quantity: `{chapter}_{slot}_{quantity}`, or `{chapter}_{quantity}`."""
        return f"{self.chapter}_{quantity}" if model is None else f"{self.chapter}_{self.slot(model)}_{quantity}"

    def put(self, model, quantity: str, value, spec: str = "") -> None:
        """Keep `value` and glue it (formatted with `spec`) under `name(model, quantity)`. Returns
        None, so a cell ending in a put shows nothing. A number or text put twice for the same model
        is a ValueError (a glue key glued twice fails the book's HTML build)."""
        store = self.shared if model is None else self.values[self.slot(model)]
        if _is_scalar(value) and quantity in store:
            # jupyter-book fails on a glue key glued twice; say which, at the put
            raise ValueError(f"{self.name(model, quantity)} is put twice in this chapter run: put each quantity once")
        store[quantity] = value
        if _is_scalar(value):
            glue_text(self.name(model, quantity), value, spec)

    def put_all(self, model, values: dict, specs: dict | None = None) -> None:
        """`put` every item of `values`; `specs` maps quantity -> format spec."""
        specs = specs or {}
        for quantity, value in values.items():
            self.put(model, quantity, value, specs.get(quantity, ""))

    @property
    def models(self) -> list[str]:
        """The run's model names in slot order, the absent second model left out."""
        return [n for n in self.names.values() if n]

    def get(self, model, quantity: str, default=None):
        if model is None:
            return self.shared.get(quantity, default)
        return self.values[self.slot(model)].get(quantity, default)

    def done(self) -> list[Path]:
        """Glue "n/a" for the absent second model's quantities, the run time, and write the files."""
        import time

        if not self.names["m2"]:
            for quantity, value in self.values["m1"].items():
                if _is_scalar(value):
                    glue_text(f"{self.chapter}_m2_{quantity}", None)
        glue_text(f"{self.chapter}_seconds", time.time() - self.started, ".0f")
        return self.save()

    def save(self) -> list[Path]:
        """Write `<chapter>-<model>.json` for each model (that model's quantities, plus the chapter-
        level ones) and the index `<chapter>.json` (which model sits in which slot, the parameters,
        the chapter-level quantities), atomically and byte-identically for the same inputs; no run
        time, no paths. The reproduction page reads these files and nothing else."""
        from types import SimpleNamespace

        from ..models import REGISTRY

        paths = []
        for slot, name in self.names.items():
            if not name:
                continue
            model = self._models.get(name)
            if model is None:
                spec = REGISTRY.get(name)
                model = SimpleNamespace(file_sha256=spec.sha256 if spec else None)
            data = {"slot": slot, "quantities": self.values[slot], "shared": self.shared}
            paths.append(save_results(self.chapter, name, self.params, data, model=model))
        index = {"slots": self.names, "shared": self.shared}
        text = results_json(self.chapter, "", self.params, index)
        paths.append(write_bytes_atomic(results_path(self.chapter, "").with_name(f"{self.chapter}.json"),
                                        text.encode("utf-8")))
        return paths


def _is_scalar(value) -> bool:
    import numbers

    return value is None or isinstance(value, (numbers.Number, str))


def read_results(chapter: str, folder: str | os.PathLike | None = None) -> dict | None:
    """The numbers one chapter run wrote, by glue-style name without the chapter prefix:
    {"m1_first_share": 0.93, "m2_model": "Gemma-3-270M (base)", "seconds": ..., ...} plus
    "params". None when the chapter has not written its index yet."""
    base = Path(folder) if folder else results_path(chapter, "x").parent
    index_path = base / f"{chapter}.json"
    if not index_path.is_file():
        return None
    index = json.loads(index_path.read_text())
    out: dict = {"params": index.get("parameters", {})}
    out.update(index["data"].get("shared", {}))
    absent = []
    for slot, name in index["data"]["slots"].items():
        if not name:
            absent.append(slot)
            continue
        path = base / results_path(chapter, name).name
        if path.is_file():
            data = json.loads(path.read_text())["data"]
            out.update({f"{slot}_{q}": v for q, v in data["quantities"].items()})
    for slot in absent:  # an absent model's numbers are None (shown as n/a), not missing
        out.update({f"{slot}_{k[3:]}": None for k in list(out) if k.startswith("m1_")})
    return out


def start(chapter: str, _types: dict | None = None, local_only: bool = False, models=None, **params):
    """A chapter's first call: check its parameters (`catchtag.book.params.check_params`, one-line
    CatchtagError on the first bad one), refuse `remote` when the chapter runs local models only,
    and open its `Results`. Returns `(params, res)`: the normalised parameters (a chapter does
    `globals().update(params)`) and the run's `Results`, whose `res.models` lists the model names.

    `models`: the models the results are filed under (default: the `model` and `compare`
    parameters); `_types`: declared types of the chapter's own parameters.
    """
    from ..errors import CatchtagError
    from .params import check_params

    params = check_params(_types=_types, **params)
    if local_only and params.get("remote"):
        raise CatchtagError(f"the {chapter} chapter runs local models only: set remote=False")
    if models is None:
        models = [params.get("model"), params.get("compare", "")]
    return params, Results(chapter, params, models)
