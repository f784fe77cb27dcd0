"""Reading text files: UTF-8 or a one-line refusal.

Every way a user's text enters catchtag from a file (the CLI's `--file`, library loaders, chapter
parameters that name files) goes through `read_text`, so a binary or wrongly encoded file is
answered with one line naming the file and the encoding, never a UnicodeDecodeError traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CatchtagError

ENCODING = "utf-8"


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises CatchtagError (one line, naming `what` and the path) when the file cannot be read or is
    not UTF-8 text: the message gives the byte offset of the first bad byte and asks for UTF-8.
    Line endings are kept as they are in the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise CatchtagError(f"cannot read {what} {str(path)!r}: it is a directory, pass a text file") from None
    except OSError as exc:
        raise CatchtagError(f"cannot read {what} {str(path)!r}: {exc.strerror or type(exc).__name__}") from None
    try:
        text = data.decode(ENCODING)
    except UnicodeDecodeError as exc:
        raise CatchtagError(
            f"{what} {str(path)!r} is not {ENCODING.upper()} text (byte 0x{data[exc.start]:02X} at offset "
            f"{exc.start} is invalid): convert it to UTF-8, e.g. `iconv -f LATIN1 -t UTF-8`"
        ) from None
    if "\x00" in text:
        raise CatchtagError(
            f"{what} {str(path)!r} contains NUL bytes: it is binary, not {ENCODING.upper()} text"
        )
    return text.removeprefix("\ufeff")
