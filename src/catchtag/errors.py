"""One exception type for input the user can fix: the CLI prints its message on one line, exit 2."""


class CatchtagError(ValueError):
    """Bad input or a missing prerequisite; the message names the problem and what to do."""
