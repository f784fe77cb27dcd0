"""Check a chapter's parameters before it does anything: one line naming the problem and the fix.

Every chapter's first code cell after its `parameters` cell calls

    globals().update(check_params(model=model, compare=compare, eps=eps, seed=seed,
                                  n_prompts=n_prompts, remote=remote))

so a bad value given to papermill (`-p eps 2`, `-p n_prompts abc`) stops the chapter at once with
a one-line `CatchtagError`, before a model is loaded or anything is written. The common parameters
have fixed rules (below); any other parameter is checked against the type it is declared with,
passed as `_types={"name": int, ...}` (the book build passes the types of the defaults in the
chapter's parameters cell). Values come back normalised: `eps=1` never passes, `n_prompts=2.0`
becomes 2, `remote="true"` becomes True, `compare=None` becomes "".

In IPython (Jupyter, papermill) a CatchtagError is shown as one line, `CatchtagError: message`,
instead of a traceback; papermill still sees the cell fail.
"""

from __future__ import annotations

import math
import numbers
import os

from ..errors import CatchtagError

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_int(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if _is_number(value) and not _is_int(value) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if not _is_int(value):
        raise CatchtagError(
            f"{name}={value!r} is not valid: {name} must be a whole number"
            + (f" >= {minimum}" if minimum is not None else "")
            + f", e.g. -p {name} {max(minimum or 0, 1)}"
        )
    if minimum is not None and value < minimum:
        raise CatchtagError(f"{name}={value!r} is not valid: {name} must be >= {minimum}")
    return int(value)


def _as_float(name: str, value) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if not _is_number(value) or not math.isfinite(value):
        raise CatchtagError(f"{name}={value!r} is not valid: {name} must be a finite number")
    return float(value)


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise CatchtagError(f"{name}={value!r} is not valid: {name} must be True or False")


def _as_str(name: str, value) -> str:
    if not isinstance(value, str):
        raise CatchtagError(
            f"{name}={value!r} is not valid: {name} must be a string (quote it: -p {name} 'text')"
        )
    return value


def _model_name(name: str, value, allow_empty: bool) -> str:
    from ..models import REGISTRY, _unknown_model_message

    if value is None and allow_empty:
        return ""
    value = _as_str(name, value).strip()
    if not value:
        if allow_empty:
            return ""
        raise CatchtagError(
            f"{name} is empty: use one of {', '.join(REGISTRY)} (offline) or a Hugging Face id"
        )
    if value not in REGISTRY and "/" not in value and not os.path.isdir(value):
        raise CatchtagError(f"{name}: {_unknown_model_message(value)}")
    return value


def _remote(value):
    from ..remote import check_remote

    if isinstance(value, str) and value.strip().lower() in ("true", "false", "local"):
        value = {"true": True, "false": False, "local": "local"}[value.strip().lower()]
    check_remote(value)
    return value


def check_value(name: str, value, kind: type | None = None):
    """One parameter, normalised, or a CatchtagError. `kind` is its declared type (None: any)."""
    if name == "model":
        return _model_name(name, value, allow_empty=False)
    if name == "compare":
        return _model_name(name, value, allow_empty=True)
    if name == "eps":
        from ..sinks import check_eps

        return check_eps(value if not isinstance(value, str) else _as_float(name, value))
    if name == "seed":
        return _as_int(name, value, minimum=0)
    if name == "n_prompts":
        return _as_int(name, value, minimum=1)
    if name == "remote":
        return _remote(value)
    if kind is None or kind is type(None):
        return value
    if kind is bool:
        return _as_bool(name, value)
    if kind is int:
        return _as_int(name, value)
    if kind is float:
        return _as_float(name, value)
    if kind is str:
        return _as_str(name, value)
    return value


def check_params(_types: dict | None = None, **params) -> dict:
    """Validate and normalise chapter parameters; raise a one-line CatchtagError on the first bad one.

    Common parameters: `model` (non-empty str: a registry name or a Hugging Face id), `compare`
    (str, "" for none), `eps` (number in (0, 1)), `seed` (int >= 0), `remote` (False, True or
    "local"; True needs NDIF_API_KEY), `n_prompts` (int >= 1). Any other parameter is checked
    against `_types[name]` (bool, int, float or str) when given.
    """
    _install_one_line_errors()
    types = dict(_types or {})
    return {name: check_value(name, value, types.get(name)) for name, value in params.items()}


def _one_line(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler: a CatchtagError is one line, not a traceback."""
    line = f"{etype.__name__}: {value}"
    shell._showtraceback(etype, value, [line])
    return [line]


def _install_one_line_errors() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or getattr(shell, "_catchtag_one_line", False):
        return
    shell.set_custom_exc((CatchtagError,), _one_line)
    shell._catchtag_one_line = True
