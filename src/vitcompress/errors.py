"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations


class VitcompressError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits non-zero, with no
    traceback (``--debug`` shows it). The message must say what to do.
    """

    def __init__(self, message: str) -> None:
        # Keep it one line, whatever the caller passed.
        super().__init__(" ".join(str(message).split()))
