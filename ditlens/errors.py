"""One exception type whose message is a single line a user can act on.

The CLI prints ``error: <message>`` and exits with status 2 instead of a traceback.
Each message names what is wrong and what to do about it.
"""

from __future__ import annotations


class DitlensError(Exception):
    """A user-facing error: bad input, a foreign file, a full disk, a mismatched plan."""

    def __init__(self, message: str) -> None:
        # Keep it one line: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))


class UnknownModelError(DitlensError):
    """No adapter claims the model."""


class TraceFormatError(DitlensError):
    """A trace is foreign, truncated, corrupt or from a newer format version."""


class PlanMismatchError(DitlensError):
    """A plan does not fit the model or run it is applied to."""
