"""Profiles, the DHT record round trip and the compatibility check."""

from __future__ import annotations

import dataclasses
import os

import pytest

from swarm.config import ConfigError, RunConfig, load_profile

from helpers import ROOT


@pytest.mark.parametrize("name", ["tiny", "small", "llama-tiny", "llama-20m"])
def test_shipped_profiles_load_by_name_and_round_trip(name):
    cfg = load_profile(name)  # a built-in profile: package data, found from any directory
    assert cfg.run_id == name and cfg.profile == name
    assert cfg == load_profile(os.path.join(ROOT, "peers", f"{name}.toml"))
    again = RunConfig.from_bytes(cfg.to_bytes())
    assert again == cfg and again.fingerprint == cfg.fingerprint


def test_run_id_override_and_validation(tmp_path):
    cfg = load_profile(os.path.join(ROOT, "peers", "tiny.toml"), run_id="exp-7")
    assert cfg.run_id == "exp-7"
    with pytest.raises(ConfigError, match="run id"):
        load_profile(os.path.join(ROOT, "peers", "tiny.toml"), run_id="bad id/with slash")


@pytest.mark.parametrize("body, message", [
    ("[model]\nn_layer = 'two'\n", "n_layer must be int"),
    ("[model]\nd_model = 100\nn_head = 3\n", "multiple of n_head"),
    ("[train]\nlearning_rate = 1.0\n", "unknown \\[train\\] keys: learning_rate"),
    ("[swarm]\ncodec = 'zip'\n", "codec must be"),
    ("[model\n", "cannot read config"),
    ("[train]\nweight_decay = -0.1\n", "weight_decay must be in"),
    ("[train]\ngrad_clip = -1.0\n", "grad_clip must be >= 0"),
    ("[train]\nouter_lr = 100.0\n", "outer_lr above 10"),
    ("[train]\ninner_lr = nan\n", "inner_lr must be a finite number"),
    ("[swarm]\nmax_group_size = 1\n", "max_group_size must be in"),
    ("[model]\nfamily = 'hf'\n", "needs config_json"),
])
def test_bad_profiles_fail_with_one_clear_line(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_compatibility_names_the_first_differing_field():
    run = load_profile(os.path.join(ROOT, "peers", "tiny.toml"))
    run.check_compatible(dataclasses.replace(run, profile="renamed"))
    other = dataclasses.replace(run, train=dataclasses.replace(run.train, inner_steps=99))
    with pytest.raises(ConfigError, match="train.inner_steps: local 20, run 99"):
        run.check_compatible(other)
    with pytest.raises(ConfigError, match="protocol"):
        run.check_compatible(dataclasses.replace(run, protocol=run.protocol + 1))
    with pytest.raises(ConfigError, match="tokenizer differs"):
        dataclasses.replace(run, tokenizer_sha256="a" * 64).check_compatible(
            dataclasses.replace(run, tokenizer_sha256="b" * 64))


def test_malformed_record_is_refused():
    with pytest.raises(ConfigError):
        RunConfig.from_bytes(b"\xc1garbage")
    with pytest.raises(ConfigError):
        RunConfig.from_bytes(b"\x93\x01\x02\x03")  # a list, not a table
