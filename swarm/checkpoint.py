"""Checkpoints on disk: atomic, verified on load, the last K kept (swarm.holder saves them in the background).

One directory per outer step, ``step-00000012/``: ``state.bin`` (the manifest's payload:
θ_global and outer momentum), ``manifest.msgpack`` (sizes and chunk hashes, the same
manifest the peer gossips), ``config.msgpack`` (the run config, so the model can be rebuilt
from the directory alone), ``tokenizer.json`` (where the run's tokenizer is not the byte one, so that
``swarm.generate`` and ``swarm.export`` need nothing else), ``inner.pt`` (this peer's own local state,
never shared: its inner optimizer and learning-rate scheduler). It is
written under a temporary name, every file and the directory fsynced, then renamed into
place, so a crash at any instant leaves the previous checkpoints intact. Loading verifies
every chunk and the model hash, and falls back to an older checkpoint with a warning.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from swarm.config import ConfigError, RunConfig
from swarm.fsutil import fsync_dir
from swarm.manifest import Manifest, unpack_state, verify_chunks
from swarm.wire import WireError

log = logging.getLogger("swarm")

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or altered; the message says which and why."""


class Loaded(NamedTuple):
    manifest: Manifest
    payload: bytes
    state: dict  # outer_step, theta_global, momentum
    inner: dict | None  # this peer's local state (optimizer, scheduler, ...), if saved and readable
    config: RunConfig | None  # the run's config, if saved
    tokenizer: bytes | None  # the run's tokenizer.json, if the run has one


@dataclass
class Saved:
    outer_step: int
    path: str
    bytes: int
    save_s: float


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save(root: str | os.PathLike, manifest: Manifest, payload: bytes | memoryview, keep: int,
         inner_state: dict | None = None, config: RunConfig | None = None, tokenizer: bytes | None = None) -> Saved:
    """Write one checkpoint atomically and prune to the newest ``keep``. Raises OSError (e.g. disk full)
    with the previous checkpoints untouched."""
    t0 = time.monotonic()
    root = Path(root)
    final = root / f"step-{manifest.outer_step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {"state.bin": payload, "manifest.msgpack": manifest.to_bytes()}
        if config is not None:
            files["config.msgpack"] = config.to_bytes()
        if tokenizer is not None:
            files["tokenizer.json"] = tokenizer
        if inner_state is not None:
            buffer = io.BytesIO()
            torch.save(inner_state, buffer)
            files["inner.pt"] = buffer.getvalue()
        for name, blob in files.items():
            with open(tmp / name, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # the same step saved before (a restart): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in step_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return Saved(manifest.outer_step, str(final), sum(memoryview(b).nbytes for b in files.values()),
                 time.monotonic() - t0)


def load(path: str | os.PathLike) -> Loaded:
    """One checkpoint directory, verified chunk by chunk and by model hash."""
    path = Path(path)
    try:
        manifest = Manifest.from_bytes((path / "manifest.msgpack").read_bytes())
        payload = (path / "state.bin").read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing {Path(e.filename).name}") from None
    except (OSError, WireError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if len(payload) != manifest.size:
        raise CheckpointError(f"{path}: state.bin is {len(payload)} bytes, the manifest says {manifest.size} "
                              f"(truncated?)")
    bad = verify_chunks(manifest, payload)
    if bad:
        raise CheckpointError(f"{path}: state.bin is altered ({len(bad)} chunks fail their sha256, first {bad[0]})")
    try:
        state = unpack_state(manifest, payload)
    except WireError as e:
        raise CheckpointError(f"{path}: {e}") from None
    config = None
    if (path / "config.msgpack").exists():
        try:
            config = RunConfig.from_bytes((path / "config.msgpack").read_bytes())
        except (OSError, ConfigError) as e:
            raise CheckpointError(f"{path}: unreadable run config ({e})") from None
    tokenizer = (path / "tokenizer.json").read_bytes() if (path / "tokenizer.json").exists() else None
    inner = None
    if (path / "inner.pt").exists():
        try:
            inner = torch.load(path / "inner.pt", weights_only=True)
        except Exception as e:  # local optimizer state is a convenience: the run goes on without it
            log.warning("%s: local optimizer state unreadable (%s); starting it afresh", path, e)
    return Loaded(manifest, payload, state, inner, config, tokenizer)


def load_latest(root: str | os.PathLike, run_id: str | None = None, numel: int | None = None) -> Loaded | None:
    """The newest checkpoint under ``root`` that verifies (of this run and size, if given), or None;
    broken ones are skipped loudly."""
    for path in step_dirs(root):
        try:
            loaded = load(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        manifest = loaded.manifest
        if run_id is not None and manifest.run_id != run_id or numel is not None and manifest.numel != numel:
            log.warning("skipping checkpoint %s: it belongs to run %r with %d parameters", path, manifest.run_id,
                        manifest.numel)
            continue
        return loaded
    return None
