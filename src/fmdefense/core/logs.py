"""One logging setup for every entry point, with third-party noise filtered out.

Foolbox's DeepFool logs "Only testing the top-10 classes" on the root logger for every batch,
burying the lines that matter; matplotlib and PIL chatter at DEBUG. `setup_logging` installs one
stderr handler that drops such records, so `--verbose` shows fmdefense's own detail.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# (logger name, message prefix) of records that repeat on every batch and say nothing new
NOISE: tuple[tuple[str, str], ...] = (("root", "Only testing the top-"),)
QUIET_LOGGERS = ("matplotlib", "PIL", "urllib3", "filelock", "fsspec")


class NoiseFilter(logging.Filter):
    """Drops records listed in `NOISE` (matched by logger name and message prefix)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in {name for name, _ in NOISE}:
            return True
        message = record.getMessage()
        return not any(record.name == n and message.startswith(p) for n, p in NOISE)


def setup_logging(verbose: bool = False, *, stream: TextIO | None = None) -> logging.Handler:
    """Log to stderr (or `stream`) at INFO, or DEBUG with `verbose`, without third-party noise.

    Calling it again replaces the handler it installed before (never anyone else's); returns
    the handler.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_fmdefense", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(NoiseFilter())
    handler._fmdefense = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
