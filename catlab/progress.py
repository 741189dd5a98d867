"""Progress of long work: a tqdm bar in a terminal, a log line every so often when the output is piped.

An evaluation of dozens of strategies runs for hours; piped to a file, a bar's carriage
returns are noise and its last state is seen only at the end. So when stderr is not a
terminal, a background timer logs ``done/total``, the rate and the ETA every
``CATLAB_PROGRESS_INTERVAL`` seconds (default 30), whether or not a unit finished in
between, and once more at the end. The ETA is the time so far per unit finished.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("catlab.progress")

#: seconds between log lines when the output is not a terminal (overridden by ``CATLAB_PROGRESS_INTERVAL``)
INTERVAL = 30.0


def interval() -> float:
    """Seconds between progress lines: ``CATLAB_PROGRESS_INTERVAL`` when set (and positive), else :data:`INTERVAL`."""
    try:
        value = float(os.environ.get("CATLAB_PROGRESS_INTERVAL", INTERVAL))
    except ValueError:
        return INTERVAL
    return value if value > 0 else INTERVAL


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``12 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class Progress:
    """``total`` units of work called ``what``; :meth:`update` as units finish, :meth:`close` at the end.

    A context manager. ``tty``: draw a bar (default: whether stderr is a terminal); otherwise log lines.
    """

    def __init__(self, total: int, what: str, unit: str = "it", tty: bool | None = None):
        self.total, self.what, self.unit = max(0, int(total)), what, unit
        self.done, self.note, self.start = 0, "", time.monotonic()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.bar, self._timer = None, None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=what, unit=unit, dynamic_ncols=True)
        else:
            log.info("%s: %d %s to do", what, self.total, unit)
            self._timer = threading.Thread(target=self._tick, name="catlab-progress", daemon=True)
            self._timer.start()

    def line(self) -> str:
        """``what: done/total unit (pct), elapsed …, ETA …[, last: note]``."""
        with self._lock:
            done, note = self.done, self.note
        elapsed = time.monotonic() - self.start
        pct = f" ({done / self.total:.0%})" if self.total else ""
        eta = duration(elapsed / done * (self.total - done)) if done else "unknown until the first one ends"
        tail = f", last: {note}" if note and done < self.total else ""
        return f"{self.what}: {done}/{self.total} {self.unit}{pct}, elapsed {duration(elapsed)}, ETA {eta}{tail}"

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more units done; ``note``: what just ended (shown in the bar and the log lines)."""
        with self._lock:
            self.done = min(self.total, self.done + n)
            self.note = note or self.note
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self._timer is not None:
            self._stop.set()
            self._timer.join()
            self._timer = None
            log.info("%s", self.line())

    def _tick(self) -> None:
        while not self._stop.wait(interval()):
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
