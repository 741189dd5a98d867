"""Whether an evaluation's wall clock can be trusted: the machine's load and the CPU time it got.

A speed-up is a ratio of wall clocks. On a shared machine another process that starts
or stops during an evaluation changes every later batch's time; the strategies take
turns on each batch, which evens most of it out, but not all. :class:`Clock` measures,
over the evaluation, the 1-minute load average before and after and the CPU time the
process got against its wall clock; :meth:`Clock.note` says in one sentence when either
shows that the machine was not the evaluation's alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

#: a CPU run that got less than this share of its threads' time waited for a core
CPU_SHARE = 0.75
#: a change of the load average (processes) that changes timings
LOAD_CHANGE = 1.0


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not every platform has one
        return None


@dataclass
class Clock:
    """Started and stopped around the timed work; ``threads``: torch's CPU threads; ``cpu``: a CPU run."""

    threads: int
    cpu: bool = True
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    load_before: float | None = None
    load_after: float | None = None
    wall: float = 0.0
    cpu_seconds: float = 0.0

    def start(self) -> Clock:
        self.load_before, self._wall, self._cpu = _load(), time.perf_counter(), time.process_time()
        return self

    def stop(self) -> Clock:
        self.wall = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu
        self.load_after = _load()
        return self

    @property
    def cpu_share(self) -> float | None:
        """CPU time over wall time × threads: about 1 when every thread had a core the whole time."""
        return self.cpu_seconds / (self.wall * max(1, self.threads)) if self.wall > 0 else None

    def note(self) -> str | None:
        """A sentence for the table when the wall clock is not to be trusted, else ``None``."""
        why = []
        if self.load_before is not None and self.load_after is not None:
            busy = max(self.load_before, self.load_after) > self.cores
            if abs(self.load_after - self.load_before) >= LOAD_CHANGE or busy:
                why.append(
                    f"the load average went from {self.load_before:.1f} to {self.load_after:.1f} on {self.cores} cores"
                )
        share = self.cpu_share
        if self.cpu and share is not None and share < CPU_SHARE:
            why.append(f"the process got {share:.0%} of its {self.threads} thread(s)' time (CPU / wall clock)")
        if not why:
            return None
        return (
            "Wall clock not to be trusted: " + " and ".join(why) + ". Other work shared the machine during "
            "the evaluation; read the speed-ups with their spread across batches, or rerun on an idle machine."
        )
