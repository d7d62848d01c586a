"""What a peer holds for the swarm: after each outer step, pack θ_global, serve it, announce it, save it.

All of it runs on one background thread, so training never waits for hashing or the disk.
Only the newest state is kept pending: when the disk is slower than the outer steps,
intermediate saves are skipped instead of queued without bound. A failed save (a full
disk, say) is a warning; the previous checkpoints stay loadable and training goes on.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable

from swarm import checkpoint
from swarm.config import RunConfig
from swarm.manifest import Manifest, pack_state

log = logging.getLogger("swarm")


class Holder:
    def __init__(self, cfg: RunConfig, publish: Callable[[Manifest, bytes], None], checkpoint_dir: str | None,
                 on_saved: Callable[[checkpoint.Saved], None]):
        self.cfg, self.publish, self.checkpoint_dir = cfg, publish, checkpoint_dir
        self.on_saved = on_saved
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        if checkpoint_dir:
            for stale in Path(checkpoint_dir).glob(".step-*.tmp-*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
        self._thread = threading.Thread(target=self._run, name="swarm-holder", daemon=True)
        self._thread.start()

    def submit(self, state: dict, inner_state: dict | None) -> None:
        """Hand over a snapshot (tensors the caller no longer mutates) of the state after an outer step."""
        item = (state, inner_state)
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
        while (item := self._queue.get()) is not None:
            state, inner_state = item
            manifest, payload = pack_state(self.cfg.run_id, state)
            try:
                self.publish(manifest, payload)
            except Exception as e:  # the network side is closing, or the DHT is unreachable for a moment
                log.debug("manifest for step %d not published: %s", manifest.outer_step, e)
            if self.checkpoint_dir and manifest.outer_step % self.cfg.swarm.checkpoint_every == 0:
                try:
                    self.on_saved(checkpoint.save(self.checkpoint_dir, manifest, payload, self.cfg.swarm.keep_checkpoints,
                                                  inner_state, self.cfg))
                except OSError as e:
                    log.warning("checkpoint of outer step %d not saved (%s); the previous ones are intact, "
                                "training goes on", manifest.outer_step, e.strerror or e)

    def close(self, timeout_s: float = 60) -> None:
        """Finish the pending snapshot (publish and save it), then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)
