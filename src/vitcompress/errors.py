"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations

import errno
import os
import shutil


class VitcompressError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``error: <message>`` on one line and exits non-zero, with no
    traceback (``--debug`` shows it). The message must say what to do.
    """

    def __init__(self, message: str) -> None:
        # Keep it one line, whatever the caller passed.
        super().__init__(" ".join(str(message).split()))


# errno values that mean "the storage refuses", not "this experiment is broken": ENOSPC, EDQUOT, EROFS.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
_STORAGE_WORDS = ("no space left on device", "disk quota exceeded", "read-only file system",
                  "file write failed")  # the last: torch's PytorchStreamWriter on a full disk


class StorageError(VitcompressError):
    """The disk is full, over quota or read-only: an environment fault, not a result of the experiment.

    Nothing is recorded as failed, so the next run retries once space is freed.
    """

    def __init__(self, where: str | os.PathLike[str], detail: str) -> None:
        free = ""
        try:
            free = f"; {shutil.disk_usage(where).free / 1e6:.0f} MB free there"
        except OSError:
            pass
        super().__init__(f"cannot write to {where}: {detail}{free}; free some space (or fix the permissions) and "
                         "run the same command again: finished rows are kept and nothing was recorded as failed")


def storage_fault(exc: BaseException) -> str | None:
    """The storage problem behind ``exc`` (it, its cause or its context), in a few words, or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            return os.strerror(exc.errno)
        text = str(exc).lower()
        word = next((w for w in _STORAGE_WORDS if w in text), None)
        if word is not None:
            return word if word != "file write failed" else "a file write failed (a full disk, most often)"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def raise_if_storage(exc: BaseException, where: str | os.PathLike[str]) -> None:
    """Raise `StorageError` (from ``exc``) when ``exc`` is the storage's fault: the disk, not the work, failed."""
    fault = storage_fault(exc)
    if fault is not None:
        raise StorageError(where, fault) from exc


def not_a_file(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a regular file to read ("does not exist", "is a FIFO (named pipe)", ...), or None.

    A FIFO or a device would block or never end (``/dev/zero``), so they are named, not opened.
    """
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a file"
    return "is not a regular file"
