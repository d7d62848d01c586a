"""Progress of long work (inner steps, downloads): a live tqdm bar on a terminal, a log line now and
then otherwise, so log files and CI output stay short and greppable.

Bars go to stderr; log records that arrive while a bar is drawn are written around it
(``log_handler``) instead of through it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from tqdm import tqdm

log = logging.getLogger("swarm")


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """``update(done, **postfix)`` as work advances. Off a terminal a log line, at most one every ``every_s``
    seconds (and none once the work is done: the caller says so itself), made by ``describe(done, total,
    rate)``, or else "done/total" and the postfix."""

    def __init__(self, label: str, total: int | None, describe: Callable[[int, int, float], str] | None = None,
                 unit: str = "it", unit_scale: bool = False, every_s: float = 2.0):
        self.label, self.total, self.describe, self.every_s = label, total, describe, every_s
        self.t0 = self.last = time.monotonic()
        self._bar = tqdm(total=total, desc=label, unit=unit, unit_scale=unit_scale, leave=False, dynamic_ncols=True,
                         file=sys.stderr) if on_terminal() else None

    def update(self, done: int, total: int | None = None, **postfix) -> None:
        if total is not None:  # a download learns its size from the manifest
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(done - self._bar.n)
            return
        now = time.monotonic()
        if now - self.last < self.every_s or self.total is not None and done >= self.total:
            return
        self.last = now
        if self.describe is not None:
            line = self.describe(done, self.total, done / max(now - self.t0, 1e-6))
        else:
            line = ", ".join([f"{done}/{self.total}", *(f"{k} {v}" for k, v in postfix.items())])
        log.info("%s: %s", self.label, line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _AroundBars(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def log_handler(stream) -> logging.Handler:
    """The handler for the CLI's log lines: one that clears and redraws bars on a terminal."""
    return _AroundBars(stream) if on_terminal() else logging.StreamHandler(stream)
