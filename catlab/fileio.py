"""Files written whole, folders checked before compute, and the one line a command ends with.

The bottom of the package: the prompt cache, the run and the sweep summary write
through :func:`write_text`; the command lines (:mod:`catlab.cli`, :mod:`catlab.sweep`)
turn an :class:`OSError` into one ``catlab:`` line with :func:`io_message` and end
with :class:`CatlabExit`.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

#: errors that mean "this place cannot be written", as opposed to a file that is missing or unreadable
WRITE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EFBIG,
}


class CatlabExit(SystemExit):
    """Ends a command with one ``catlab:`` line on stderr and exit status ``code`` (1: an error)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(code)
        self.message = message if message.startswith("catlab:") else f"catlab: {message}"


def io_message(err: OSError, where: Path | str | None = None) -> str:
    """``catlab: cannot write <path>: <reason>`` for an error that stops a write; ``cannot access`` otherwise.

    An error that names no file (a write to an open file descriptor on a full disk)
    is named by ``where``, the folder being written, so the line always says where.
    """
    if err.filename is not None:
        path = str(err.filename)
    elif where is not None:
        path = f"a file in {where}"
    else:
        path = "a file"
    reason = err.strerror or str(err)
    if err.errno in WRITE_ERRNOS:
        return f"catlab: cannot write {path}: {reason}"
    return f"catlab: cannot access {path}: {reason}"


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or its cause: logging and Hydra wrap them), if any."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def check_writable(folder: Path | str) -> None:
    """Fail now, before any compute, where ``folder`` cannot be made or written; leave nothing behind.

    Makes the missing folders, writes and removes a small probe file, then removes
    the folders it made (the run makes them again when it writes). Raises
    :class:`OSError` naming the path.
    """
    folder = Path(folder).expanduser()
    missing, p = [], folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(p))
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".catlab-probe-")
        try:
            os.write(fd, b"catlab")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:  # named by the folder the run asked for, not by the probe
        raise type(err)(err.errno, err.strerror, str(folder)) from None
    finally:
        for d in reversed(made):
            d.rmdir()


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a ``.tmp`` file renamed over it; removed when the write fails)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
