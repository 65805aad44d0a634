"""Progress of long stages, visible in a terminal and in logs alike.

tqdm with `disable=None` draws a bar on a terminal and prints nothing otherwise, so a job whose
stderr goes to a log file (CI, nohup, a cluster) showed no sign of life for hours. `progress`
draws the same bar on a terminal; elsewhere it logs one line at least every `interval` seconds
(default 30, `$FMDEFENSE_PROGRESS_INTERVAL`), from a background timer too, so one slow step
still gets a heartbeat.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
DEFAULT_INTERVAL = 30.0
log = logging.getLogger("fmdefense.progress")


def stderr_is_tty() -> bool:
    """Whether stderr is a terminal (where a tqdm bar is visible)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def default_interval() -> float:
    """Seconds between log lines: `$FMDEFENSE_PROGRESS_INTERVAL` or 30."""
    try:
        value = float(os.environ.get("FMDEFENSE_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


class Progress(Generic[T]):
    """Iterate like tqdm: a bar on a terminal, periodic log lines elsewhere.

    `set_postfix(**values)` adds figures (loss, accuracy) to the bar and to the log lines.
    """

    def __init__(
        self,
        iterable: Iterable[T],
        *,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        leave: bool = True,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else _length(iterable)
        self.interval = default_interval() if interval is None else interval
        self.count, self.postfix = 0, ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar: Any = None
        if stderr_is_tty() if tty is None else tty:
            self._bar = tqdm(iterable, desc=desc, total=self.total, unit=unit, leave=leave)

    def set_postfix(self, **values: Any) -> None:
        """Show `values` beside the count (bar postfix, or the end of each log line)."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        with self._lock:
            self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self) -> Iterator[T]:
        if self._bar is not None:
            yield from self._bar
            return
        start = last = time.monotonic()
        timer = self._start_timer(start)
        try:
            for item in self.iterable:
                yield item
                with self._lock:
                    self.count += 1
                now = time.monotonic()
                if now - last >= self.interval:
                    self._log(start, now)
                    last = now
        finally:
            self._stop.set()
            if timer is not None:
                timer.join(timeout=1.0)
        self._finish(start)

    def _start_timer(self, start: float) -> threading.Thread | None:
        """A daemon thread logging every `interval` s while one step runs long."""
        if self.interval <= 0:
            return None

        def beat() -> None:
            while not self._stop.wait(self.interval):
                self._log(start, time.monotonic())

        thread = threading.Thread(target=beat, name=f"progress:{self.desc}", daemon=True)
        thread.start()
        return thread

    def _log(self, start: float, now: float) -> None:
        with self._lock:
            count, postfix = self.count, self.postfix
        elapsed = now - start
        if self.total:
            left = elapsed / count * (self.total - count) if count else float("nan")
            eta = f", ~{left:.0f} s left" if count else ""
            where = f"{count}/{self.total} {self.unit} ({100 * count / self.total:.0f}%)"
        else:
            where, eta = f"{count} {self.unit}", ""
        tail = f"; {postfix}" if postfix else ""
        log.info("%s: %s, %.0f s elapsed%s%s", self.desc, where, elapsed, eta, tail)

    def _finish(self, start: float) -> None:
        elapsed = time.monotonic() - start
        level = logging.INFO if elapsed >= self.interval > 0 else logging.DEBUG
        tail = f"; {self.postfix}" if self.postfix else ""
        done = f"{self.count} {self.unit} in {elapsed:.0f} s"
        log.log(level, "%s: done, %s%s", self.desc, done, tail)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
    interval: float | None = None,
) -> Progress[T]:
    """Wrap `iterable` for a long stage: tqdm bar on a terminal, else a log line at least every
    `interval` s (default 30, `$FMDEFENSE_PROGRESS_INTERVAL`) on logger `fmdefense.progress`."""
    return Progress(iterable, desc=desc, total=total, unit=unit, leave=leave, interval=interval)
