"""Run configuration: one frozen, validated record that every peer of a run shares.

A profile (``swarm/profiles/*.toml``, or any TOML file) fills it; the first peer adds what it
derived (the tokenizer's and the data's hashes, the model's parameter signature and the hash of
θ_0), publishes it in the DHT, and joiners read it from there, so two peers of one run can never
train different models. ``fingerprint`` is what peers compare: the config plus the wire protocol.
docs/architecture.md lists every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import msgpack

# Bump when the all-reduce, join or state-transfer wire format changes: peers of
# different protocol versions refuse each other's run instead of corrupting it.
PROTOCOL_VERSION = 3

# Filled by the run's first peer from what it built, not from the profile: compared on their own.
_DERIVED = ("tokenizer_sha256", "data_name", "data_sha256", "model_numel", "signature_sha256", "signature",
            "theta0_sha256")
_TOP_LEVEL = ("run_id", "profile", "protocol", *_DERIVED)
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FAMILIES = ("gpt", "llama", "hf", "custom")
TOKENIZERS = ("byte", "bpe4k", "file")
CODECS = ("int8", "int4", "fp32")
PRIVATE_DATA = ""  # data_sha256 of a run where each peer brings its own data
SIGNATURE_MAX_BYTES = 8192  # compressed signature kept in the config record; larger models keep only its hash
HF_CONFIG_MAX_BYTES = 16384


class ConfigError(ValueError):
    """A profile, flag or DHT record that cannot describe a valid run (exit code 2)."""


@dataclass(frozen=True)
class ModelConfig:
    """The model every peer builds. ``family``: ``gpt`` (swarm's own byte-level GPT), ``llama`` (transformers'
    LlamaForCausalLM sized by the fields below), ``hf`` (any transformers causal LM from a ``config.json``,
    whose text travels in ``hf_config``) or ``custom`` (a Python API user's own module: the run knows it only by
    its parameter signature). The vocabulary size comes from the tokenizer."""

    family: str = "gpt"
    tokenizer: str = "byte"  # "byte" (256 ids), "bpe4k" (trained on the corpus) or "file" (a tokenizer.json)
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 0  # llama: key/value heads for grouped-query attention (0: n_head)
    d_model: int = 128
    d_ff: int = 0  # llama: MLP width (0: about 8/3 d_model, a multiple of 64)
    seq_len: int = 128  # tokens per training window
    dropout: float = 0.0
    rope_theta: float = 10000.0  # llama
    hf_config: str = ""  # family "hf": the config.json, canonical JSON (a profile names the file: config_json)

    def __post_init__(self):
        _check(self.family in FAMILIES, f"model.family must be one of {', '.join(FAMILIES)}, not {self.family!r}")
        _check(self.tokenizer in TOKENIZERS,
               f"model.tokenizer must be 'byte', 'bpe4k' or 'file' (a tokenizer.json), not {self.tokenizer!r}")
        _check(min(self.n_layer, self.n_head, self.d_model, self.seq_len) > 0, "model sizes must be positive")
        _check(self.d_model % self.n_head == 0, f"model.d_model={self.d_model} must be a multiple of n_head={self.n_head}")
        _check(self.n_kv_head >= 0 and (self.n_kv_head == 0 or self.n_head % self.n_kv_head == 0),
               f"model.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        _check(self.d_ff >= 0, "model.d_ff must be >= 0")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(_finite(self.rope_theta) and self.rope_theta > 0, "model.rope_theta must be positive")
        _check((self.family == "hf") == bool(self.hf_config),
               "model.family = 'hf' needs config_json (a transformers config.json), and only it")
        _check(len(self.hf_config.encode()) <= HF_CONFIG_MAX_BYTES,
               f"model.config_json is larger than {HF_CONFIG_MAX_BYTES} bytes")


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
    grad_clip: float = 1.0  # max gradient norm per inner step (0: no clipping)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    seed: int = 0  # model init; peers derive their data seeds from it
    overlap: bool = False  # average in the background while the next round trains (one-step-delayed update)
    autocast: str = "off"  # "bf16": inner steps under bf16 autocast on CUDA devices (fp32 elsewhere)

    def __post_init__(self):
        _check(self.batch_size > 0 and self.inner_steps > 0, "train.batch_size and train.inner_steps must be positive")
        for name in ("inner_lr", "outer_lr", "weight_decay", "grad_clip", "min_lr_ratio", "outer_momentum"):
            _check(_finite(getattr(self, name)), f"train.{name} must be a finite number")
        _check(self.inner_lr > 0 and self.outer_lr > 0, "learning rates must be positive")
        _check(self.outer_lr <= 10, "train.outer_lr above 10 cannot train (DiLoCo uses 0.7)")
        _check(0 <= self.warmup_steps, "train.warmup_steps must be >= 0")
        _check(self.schedule_outer_steps > 0, "train.schedule_outer_steps must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
        _check(0.0 <= self.outer_momentum < 1.0, "train.outer_momentum must be in [0, 1)")
        _check(0.0 <= self.weight_decay < 1.0, "train.weight_decay must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0: no clipping)")
        _check(self.autocast in ("off", "bf16"), f"train.autocast must be 'off' or 'bf16', not {self.autocast!r}")


@dataclass(frozen=True)
class SwarmConfig:
    """How peers meet and average; every value is in seconds unless named otherwise. Every wait a peer does
    is capped by a value derived from these (swarm.caps; docs/architecture.md, "Caps")."""

    codec: str = "int8"  # pseudo-gradients on the wire: "int8", "int4" (blockwise absmax; int4 with error feedback)
    block_size: int = 1024  # values per fp32 scale of the int8 and int4 codecs (int4 wants 128)
    chunk_values: int = 1 << 20  # all-reduce pipeline unit: each chunk of a part is reduced and sent back on its own
    gather_timeout_s: float = 30.0  # how long a ready peer waits for expected peers to be ready too
    join_timeout_s: float = 15.0  # how long a follower waits for its leader's group
    allreduce_timeout_s: float = 60.0  # longest silence on an all-reduce or download stream
    heartbeat_s: float = 2.0  # liveness record refresh period
    dht_timeout_s: float = 10.0  # one DHT request
    min_bandwidth_mbit: float = 1.0  # the slowest link a peer may have: transfers of S bytes get S at this rate
    checkpoint_every: int = 1  # outer steps between checkpoints on disk (with --checkpoint-dir)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    adopt_loss_margin: float = 0.05  # a newer state is adopted if its loss is at most this much worse than ours
    max_group_size: int = 256  # above it, a round's peers split into groups that change every round
    min_peers: int = 1  # round 1 starts once this many peers are live (or min_peers_timeout_s passed)
    min_peers_timeout_s: float = 60.0

    def __post_init__(self):
        _check(self.codec in CODECS, f"swarm.codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        _check(self.block_size > 0, "swarm.block_size must be positive")
        _check(self.codec != "int4" or self.block_size % 8 == 0, "swarm.block_size must be a multiple of 8 for int4")
        _check(self.chunk_values > 0 and self.chunk_values % self.block_size == 0,
               "swarm.chunk_values must be a positive multiple of swarm.block_size")
        _check(self.checkpoint_every > 0 and self.keep_checkpoints > 0,
               "swarm.checkpoint_every and swarm.keep_checkpoints must be positive")
        timeouts = (self.gather_timeout_s, self.join_timeout_s, self.allreduce_timeout_s, self.heartbeat_s,
                    self.dht_timeout_s, self.min_bandwidth_mbit)
        _check(all(_finite(t) and 0 < t <= 3600 for t in timeouts),
               "swarm timeouts and min_bandwidth_mbit must be positive and at most 3600")
        _check(_finite(self.adopt_loss_margin) and 0 <= self.adopt_loss_margin <= 1,
               "swarm.adopt_loss_margin must be in [0, 1]")
        _check(2 <= self.max_group_size <= 4096, "swarm.max_group_size must be in 2..4096")
        _check(1 <= self.min_peers <= 4096, "swarm.min_peers must be in 1..4096")
        _check(_finite(self.min_peers_timeout_s) and 0 <= self.min_peers_timeout_s <= 86400,
               "swarm.min_peers_timeout_s must be in [0, 86400]")


@dataclass(frozen=True)
class RunConfig:
    run_id: str = "swarm"
    profile: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    protocol: int = PROTOCOL_VERSION
    # Derived by the run's first peer (empty in a profile): every peer must match them.
    tokenizer_sha256: str = ""  # every peer must derive the same token ids
    data_name: str = ""  # what the run trains on, for people ("shakespeare (embedded)", a file name)
    data_sha256: str = PRIVATE_DATA  # of the training data; empty: each peer brings its own
    model_numel: int = 0  # parameters in θ
    signature_sha256: str = ""  # of the parameters' names, shapes and dtypes, in order (swarm.signature)
    signature: bytes = b""  # the same list, zlib-compressed msgpack, when it fits in SIGNATURE_MAX_BYTES
    theta0_sha256: str = ""  # model_sha256 of θ_0, the run's initial parameters

    def __post_init__(self):
        _check(bool(RUN_ID_RE.match(self.run_id)),
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
        kwargs: dict[str, Any] = {}
        for key in _TOP_LEVEL:
            if key in data:
                default = getattr(cls(), key)
                _check(isinstance(data[key], type(default)) and not isinstance(data[key], bool),
                       f"run config {key} must be {type(default).__name__}")
                kwargs[key] = data[key]
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

    @property
    def private_data(self) -> bool:
        return self.data_sha256 == PRIVATE_DATA

    def check_compatible(self, other: "RunConfig") -> None:
        """Raise ConfigError naming the first field where a local profile disagrees with the run's."""
        if self.protocol != other.protocol:
            raise ConfigError(f"run {other.run_id!r} uses protocol {other.protocol}, this peer speaks {self.protocol}: upgrade swarm")
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        if self.tokenizer_sha256 and other.tokenizer_sha256 and self.tokenizer_sha256 != other.tokenizer_sha256:
            raise ConfigError(f"this peer's {self.model.tokenizer} tokenizer differs from run {other.run_id!r}'s "
                              f"({self.tokenizer_sha256[:12]} vs {other.tokenizer_sha256[:12]})")
        for key in sorted(set(mine) | set(theirs)):
            if key not in ("profile", *_DERIVED) and mine.get(key) != theirs.get(key):
                raise ConfigError(f"--config disagrees with run {other.run_id!r} on {key}: "
                                  f"local {mine.get(key)!r}, run {theirs.get(key)!r}")


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped in the package (``--config tiny``)."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("swarm").joinpath("profiles").iterdir()
                  if p.name.endswith(".toml"))


def profile_path(name_or_path: str) -> str:
    """A profile file: ``name_or_path`` itself if it is a file, else the built-in profile of that name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    builtin = resources.files("swarm").joinpath("profiles", f"{name_or_path}.toml")
    if os.sep not in name_or_path and not name_or_path.endswith(".toml") and builtin.is_file():
        return str(builtin)
    raise ConfigError(f"--config: no such file or built-in profile: {name_or_path} "
                      f"(built-in: {', '.join(builtin_profiles())})")


def load_profile(path: str | os.PathLike, run_id: str | None = None) -> RunConfig:
    """Read a TOML profile (a path, or a built-in profile's name); ``run_id`` (from --run-id) overrides the
    profile's. ``[model] config_json`` (a path relative to the profile) is read into ``model.hf_config``."""
    path = profile_path(str(path))
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
    model = data.get("model")
    if isinstance(model, dict) and "config_json" in model:
        model["hf_config"] = read_hf_config(Path(path).parent / str(model.pop("config_json")))
    return RunConfig.from_dict(data)


def write_profile(cfg: RunConfig, path: str | os.PathLike) -> str:
    """``cfg`` as a TOML profile that load_profile reads back to the same config (its derived fields aside)."""
    lines = ["[run]", f"run_id = {json.dumps(cfg.run_id)}", f"profile = {json.dumps(cfg.profile)}"]
    for section in ("model", "train", "swarm"):
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml(value)}" for key, value in dataclasses.asdict(getattr(cfg, section)).items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    derived = {k: getattr(cfg, k) for k in _DERIVED}
    if dataclasses.replace(load_profile(path), **derived) != cfg:
        raise ConfigError(f"{path} does not read back as the profile it was written from")
    return str(path)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def read_hf_config(path: str | os.PathLike) -> str:
    """A transformers ``config.json`` as canonical JSON text (sorted keys, no spaces): the same file gives the
    same run config on every peer."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"[model] config_json: no such file: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"[model] config_json: cannot read {path}: {e}") from None
    _check(isinstance(data, dict) and isinstance(data.get("model_type"), str),
           f"[model] config_json: {path} is not a transformers config (no model_type)")
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def pack_signature(signature: list[tuple[str, tuple[int, ...], str]]) -> tuple[str, bytes]:
    """(sha256, compressed form) of a parameter signature; the compressed form is empty when too large."""
    blob = msgpack.packb([[name, list(shape), dtype] for name, shape, dtype in signature], use_bin_type=True)
    packed = zlib.compress(blob, 9)
    return hashlib.sha256(blob).hexdigest(), packed if len(packed) <= SIGNATURE_MAX_BYTES else b""


def unpack_signature(packed: bytes) -> list[tuple[str, tuple[int, ...], str]] | None:
    """The signature a config carries, or None where it carries only the hash (or garbage)."""
    if not packed:
        return None
    try:
        blob = zlib.decompressobj().decompress(packed, 1 << 22)
        return [(str(n), tuple(int(d) for d in s), str(t)) for n, s, t in msgpack.unpackb(blob, raw=False)]
    except Exception:
        return None


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


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
