"""What a peer holds for the swarm: after each outer step, describe θ_global, serve it, announce it, save it.

All of it runs on one background thread, so training never waits for hashing or the disk. On Linux
that thread runs at a lower CPU priority (nice +BACKGROUND_NICE): where every core trains, hashing takes
idle time instead of slowing the inner steps (CPU training threads wait on each other, so a core taken
from one of them stalls them all). The state is served from the live θ_global/momentum buffer without a
copy (swarm.diloco.OuterState): its ``generation`` tells whether the buffer still holds the state a
manifest describes. Only the newest state is kept pending: when the disk is slower than the outer steps,
intermediate saves are skipped instead of queued without bound. A failed save (a full disk, say) is a
warning; the previous checkpoints stay loadable and training goes on.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from swarm import checkpoint
from swarm.config import RunConfig
from swarm.manifest import Manifest, pack_state

log = logging.getLogger("swarm")

BACKGROUND_NICE = 10  # added to the holder thread's nice value


class Holder:
    def __init__(self, cfg: RunConfig, publish: Callable[[Manifest, memoryview, Callable[[], bool]], None],
                 generation: Callable[[], int], checkpoint_dir: str | None, tokenizer: bytes | None,
                 on_saved: Callable[[checkpoint.Saved], None]):
        self.cfg, self.publish, self.generation = cfg, publish, generation
        self.checkpoint_dir, self.tokenizer, self.on_saved = checkpoint_dir, tokenizer, on_saved
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        if checkpoint_dir:
            for stale in Path(checkpoint_dir).glob(".step-*.tmp-*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
        self._thread = threading.Thread(target=self._run, name="swarm-holder", daemon=True)
        self._thread.start()

    def submit(self, state: dict, local_state: dict | None) -> None:
        """Hand over the state after an outer step (a view of the live buffer, with its ``generation``) and, when
        a checkpoint is due, a copy of this peer's local state (optimizer, scheduler, ...)."""
        self._put((state, local_state))

    def _put(self, item) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the older pending snapshot
                except queue.Empty:
                    pass

    def _run(self) -> None:
        _lower_this_threads_priority()
        while (item := self._queue.get()) is not None:
            try:
                self._hold(*item)
            except Exception as e:  # our own failure: logged, and the next state is held as usual
                log.warning("holding the state failed: %s: %s", type(e).__name__, e)
                log.debug("holding the state failed", exc_info=True)

    def _hold(self, state: dict, local_state: dict | None) -> None:
        generation = state["generation"]
        manifest, payload = pack_state(self.cfg.run_id, state)
        if self.generation() != generation:
            return  # the state moved on while we hashed it: the newer one is already queued
        try:
            self.publish(manifest, payload, lambda: self.generation() == generation)
        except Exception as e:  # the network side is closing, or the DHT is unreachable for a moment
            log.debug("state of step %d not announced: %s", manifest.outer_step, e)
        if local_state is None or not self.checkpoint_dir:  # no checkpoint due
            return
        copy = bytes(payload)  # the disk is slow: save a copy, so the live state may move on meanwhile
        if self.generation() != generation:
            log.info("checkpoint of outer step %d skipped: the state moved on while it was copied",
                     manifest.outer_step)
            return
        try:
            self.on_saved(checkpoint.save(self.checkpoint_dir, manifest, copy, self.cfg.swarm.keep_checkpoints,
                                          local_state, self.cfg, self.tokenizer))
        except OSError as e:
            log.warning("checkpoint of outer step %d not saved (%s); the previous ones are intact, "
                        "training goes on", manifest.outer_step, e.strerror or e)

    def close(self, timeout_s: float = 60) -> bool:
        """Finish the pending state (announce and save it), then stop; False if that took longer than
        ``timeout_s`` (the thread is a daemon: it cannot keep the process alive)."""
        deadline = time.monotonic() + timeout_s
        try:  # behind the pending state, if any: a dead thread cannot make this wait forever
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()


def _lower_this_threads_priority() -> None:
    """Linux schedules each thread on its own: setpriority on this thread's id renices it alone (elsewhere the id
    would name a process, so nothing is done there)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError as e:  # a sandbox that forbids it: the holder still works, at normal priority
        log.debug("holder thread keeps its priority: %s", e)
