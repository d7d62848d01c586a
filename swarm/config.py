"""Run configuration: one frozen, validated record that every peer of a run shares.

A profile (``peers/*.toml``) fills it; the first peer publishes it in the DHT and
joiners read it from there, so two peers of one run can never train different
models. ``fingerprint`` is what peers compare: the config plus the wire protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

import msgpack

# Bump when the all-reduce, join or state-transfer wire format changes: peers of
# different protocol versions refuse each other's run instead of corrupting it.
PROTOCOL_VERSION = 2

_TOP_LEVEL = ("run_id", "profile", "protocol", "tokenizer_sha256")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A profile, flag or DHT record that cannot describe a valid run (exit code 2)."""


@dataclass(frozen=True)
class ModelConfig:
    """GPT shape; the vocabulary size comes from the tokenizer."""

    tokenizer: str = "byte"  # "byte" (256 ids) or "bpe4k" (trained on the corpus)
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128  # tokens per training window
    dropout: float = 0.0

    def __post_init__(self):
        _check(self.tokenizer in ("byte", "bpe4k"), f"model.tokenizer must be 'byte' or 'bpe4k', not {self.tokenizer!r}")
        _check(min(self.n_layer, self.n_head, self.d_model, self.seq_len) > 0, "model sizes must be positive")
        _check(self.d_model % self.n_head == 0, f"model.d_model={self.d_model} must be a multiple of n_head={self.n_head}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """DiLoCo hyper-parameters (arXiv 2311.08105): H inner AdamW steps, then one outer Nesterov step."""

    batch_size: int = 8  # sequences per inner step
    inner_steps: int = 20  # H
    inner_lr: float = 3e-3  # peak AdamW lr
    warmup_steps: int = 10  # inner steps of linear warmup
    schedule_outer_steps: int = 100  # cosine decay length, in outer steps
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of inner_lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    seed: int = 0  # model init; peers derive their data seeds from it
    overlap: bool = False  # average in the background while the next round trains (one-step-delayed update)

    def __post_init__(self):
        _check(self.batch_size > 0 and self.inner_steps > 0, "train.batch_size and train.inner_steps must be positive")
        _check(self.inner_lr > 0 and self.outer_lr > 0, "learning rates must be positive")
        _check(0 <= self.warmup_steps, "train.warmup_steps must be >= 0")
        _check(self.schedule_outer_steps > 0, "train.schedule_outer_steps must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
        _check(0.0 <= self.outer_momentum < 1.0, "train.outer_momentum must be in [0, 1)")


@dataclass(frozen=True)
class SwarmConfig:
    """How peers meet and average; every value is in seconds unless named otherwise."""

    codec: str = "int8"  # pseudo-gradients on the wire: "int8" (blockwise absmax) or "fp32"
    block_size: int = 1024  # int8 codec elements per scale
    chunk_values: int = 1 << 20  # all-reduce pipeline unit: each chunk of a part is reduced and sent back on its own
    gather_timeout_s: float = 30.0  # how long a ready peer waits for expected peers to be ready too
    join_timeout_s: float = 15.0  # how long a follower waits for its leader's group
    allreduce_timeout_s: float = 60.0  # bound on one all-reduce, per stream read
    heartbeat_s: float = 2.0  # liveness record refresh period
    checkpoint_every: int = 1  # outer steps between checkpoints on disk (with --checkpoint-dir)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk

    def __post_init__(self):
        _check(self.codec in ("int8", "fp32"), f"swarm.codec must be 'int8' or 'fp32', not {self.codec!r}")
        _check(self.block_size > 0, "swarm.block_size must be positive")
        _check(self.chunk_values > 0 and self.chunk_values % self.block_size == 0,
               "swarm.chunk_values must be a positive multiple of swarm.block_size")
        _check(self.checkpoint_every > 0 and self.keep_checkpoints > 0,
               "swarm.checkpoint_every and swarm.keep_checkpoints must be positive")
        _check(min(self.gather_timeout_s, self.join_timeout_s, self.allreduce_timeout_s, self.heartbeat_s) > 0,
               "swarm timeouts must be positive")


@dataclass(frozen=True)
class RunConfig:
    run_id: str = "swarm"
    profile: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    protocol: int = PROTOCOL_VERSION
    tokenizer_sha256: str = ""  # filled by the run's first peer: every peer must derive the same token ids

    def __post_init__(self):
        _check(bool(_RUN_ID.match(self.run_id)),
               f"run id {self.run_id!r} must be 1-64 letters, digits, '.', '_' or '-'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError("run config must be a table")
        sections = {"model": ModelConfig, "train": TrainConfig, "swarm": SwarmConfig}
        unknown = set(data) - set(sections) - set(_TOP_LEVEL)
        _check(not unknown, f"unknown run config keys: {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {k: data[k] for k in _TOP_LEVEL if k in data}
        for name, section in sections.items():
            kwargs[name] = _section(section, name, data.get(name, {}))
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad run config: {e}") from None

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "RunConfig":
        if len(blob) > 64 * 1024:
            raise ConfigError(f"run config record of {len(blob)} bytes is too large")
        try:
            data = msgpack.unpackb(blob, raw=False)
        except Exception as e:
            raise ConfigError(f"malformed run config record: {e}") from None
        return cls.from_dict(data)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical record: equal fingerprints mean peers train the same run."""
        return hashlib.sha256(msgpack.packb(self.to_dict(), use_bin_type=True)).hexdigest()

    def check_compatible(self, other: "RunConfig") -> None:
        """Raise ConfigError naming the first field where a local profile disagrees with the run's."""
        if self.protocol != other.protocol:
            raise ConfigError(f"run {other.run_id!r} uses protocol {other.protocol}, this peer speaks {self.protocol}: upgrade swarm")
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        if self.tokenizer_sha256 and other.tokenizer_sha256 and self.tokenizer_sha256 != other.tokenizer_sha256:
            raise ConfigError(f"this peer's {self.model.tokenizer} tokenizer differs from run {other.run_id!r}'s "
                              f"({self.tokenizer_sha256[:12]} vs {other.tokenizer_sha256[:12]})")
        for key in sorted(set(mine) | set(theirs)):
            if key not in ("profile", "tokenizer_sha256") and mine.get(key) != theirs.get(key):
                raise ConfigError(f"--config disagrees with run {other.run_id!r} on {key}: "
                                  f"local {mine.get(key)!r}, run {theirs.get(key)!r}")


def load_profile(path: str | os.PathLike, run_id: str | None = None) -> RunConfig:
    """Read a TOML profile; ``run_id`` (from --run-id) overrides the profile's."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    run = data.pop("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: [run] must be a table")
    data["profile"] = run.pop("profile", os.path.splitext(os.path.basename(str(path)))[0])
    data["run_id"] = run.pop("run_id", data["profile"])
    if run_id:
        data["run_id"] = run_id
    _check(not run, f"{path}: unknown [run] keys: {', '.join(sorted(run))}")
    return RunConfig.from_dict(data)


def _section(cls, name: str, values: Any):
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    _check(not unknown, f"unknown [{name}] keys: {', '.join(sorted(unknown))}")
    for key, value in values.items():
        default = getattr(cls(), key)
        ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        _check(ok and not (isinstance(value, bool) and not isinstance(default, bool)),
               f"[{name}] {key} must be {type(default).__name__}, not {value!r}")
    try:
        return cls(**{k: float(v) if isinstance(getattr(cls(), k), float) else v for k, v in values.items()})
    except ConfigError as e:
        raise ConfigError(f"[{name}] {e}") from None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
