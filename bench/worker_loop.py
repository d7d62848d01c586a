"""The command loop every benchmark worker runs inside its namespace: JSON lines in, JSON lines out."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable

import torch


def run_worker(make_peer: Callable[[], Any], threads: int) -> None:
    """A worker's whole life: replies go to the original stdout while everything else printed goes to
    stderr (the worker's log); ``loaded`` once ``make_peer()`` returns, the command loop, then ``closed``."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    try:
        peer = make_peer()
    except Exception as e:
        reply({"error": f"load failed: {type(e).__name__}: {e}"})
        raise
    reply({"loaded": True})
    try:
        serve(peer, reply)
    finally:
        reply({"closed": True})


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
