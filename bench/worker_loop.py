"""The command loop every benchmark worker runs inside its namespace: JSON lines in, JSON lines out."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable


def serve(peer: Any, reply: Callable[[dict], None]) -> None:
    """Call ``peer.<cmd>(**args)`` for each command line on stdin until ``quit``; errors become replies."""
    try:
        for line in sys.stdin:
            command = json.loads(line)
            name = command.pop("cmd")
            if name == "quit":
                break
            try:
                reply(getattr(peer, name)(**command))
            except Exception as e:
                logging.getLogger(__name__).debug("%s failed", name, exc_info=True)
                reply({"error": f"{name} failed: {type(e).__name__}: {e}"})
    finally:
        peer.close()
