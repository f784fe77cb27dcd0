"""The `remote` parameter every chapter takes: False (local), True (NDIF) or "local" (dry run).

With True, nnsight reads the NDIF API key from the environment variable NDIF_API_KEY itself; the key
is never a parameter, never printed, and never stored in a result or an executed notebook.
"""

from __future__ import annotations

import os

from .errors import CatchtagError

REMOTE_CHOICES = (False, True, "local")


def check_remote(remote) -> None:
    """Raise a CatchtagError unless `remote` is a valid choice and, for NDIF, a key is set."""
    if remote not in REMOTE_CHOICES or isinstance(remote, (int, float)) and not isinstance(remote, bool):
        raise CatchtagError(
            f"remote={remote!r} is not valid: use False (run here), True (run on NDIF) or 'local' "
            "(offline dry run of the remote path)"
        )
    if remote is True and not os.environ.get("NDIF_API_KEY"):
        raise CatchtagError(
            "remote=True needs an NDIF API key: export NDIF_API_KEY=... (from https://login.ndif.us) "
            "before starting Jupyter or the CLI"
        )


def trace_kwargs(remote) -> dict:
    """Keyword arguments for `lm.trace(...)` for this value of `remote`."""
    check_remote(remote)
    return {} if remote is False else {"remote": remote}
