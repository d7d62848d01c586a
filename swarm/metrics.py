"""Metrics: one JSON object a line (the contract in docs/architecture.md), and short progress lines for people.

Each event is written and flushed at once, so a peer killed mid-run leaves every
completed event readable and at most the last line torn.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict, deque
from typing import IO, Any

log = logging.getLogger("swarm")


class Metrics:
    """Writes events to the metrics file and keeps the latest of each kind in memory for the dashboard."""

    HISTORY = 2000  # events of each kind kept in memory

    def __init__(self, path: str | None, peer_id: str, name: str):
        self.peer_id, self.name = peer_id, name
        self._file: IO[str] | None = open(path, "a", buffering=1, encoding="utf-8") if path else None
        self.recent: dict[str, deque[dict]] = defaultdict(lambda: deque(maxlen=self.HISTORY))
        self._lock = threading.Lock()  # the holder thread emits `checkpoint` events too

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "t": round(time.time(), 3), "peer": self.peer_id, "name": self.name, **fields}
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.recent[event].append(record)
        return record

    def snapshot(self, event: str) -> list[dict]:
        """A copy of the recent events of one kind (another thread may be appending meanwhile)."""
        with self._lock:
            return list(self.recent.get(event, ()))

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_events(path: str, event: str | None = None) -> list[dict]:
    """Parse a metrics file (none yet reads as empty), skipping a torn last line; filter by event name."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event is None or record.get("event") == event:
                out.append(record)
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
