"""``python -m swarm.export`` on checkpoints written as a peer writes them: transformers loads the export and
computes swarm's logits; a GPT export holds θ under its names; bad input is one line and exit code 2."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import tokenizers
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import run_cli
from helpers import GPT2_JSON, corpus_sampler, corpus_text, run_config, save_checkpoint, theta_sha256, train
from swarm import checkpoint
from swarm import data as swarm_data
from swarm.architectures import build_model, causal_lm_logits
from swarm.signature import global_parameters, model_sha256


@pytest.mark.parametrize("family", ["llama", "hf"])
def test_transformers_export_loads_with_the_same_logits(tmp_path, family):
    cfg = run_config("llama-tiny", 256, **({"family": "hf", "hf_config": GPT2_JSON} if family == "hf" else {}))
    model = build_model(cfg.model, 256, cfg.train.seed)
    save_checkpoint(tmp_path / "ck", cfg, model, outer_step=1)
    sampler = corpus_sampler(cfg.model.seq_len, 4)
    train(model, sampler, steps=3)
    assert theta_sha256(model) != cfg.theta0_sha256
    save_checkpoint(tmp_path / "ck", cfg, model, outer_step=2)

    out = tmp_path / "export"
    done = run_cli("swarm.export", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == f"exported run 'llama-tiny' at outer step 2 ({family}, {cfg.model_numel:,} parameters) " \
                          f"to {out}\n"
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ck", "export"]  # no temporary directory left behind

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config._attn_implementation == "sdpa" and next(loaded.parameters()).dtype == torch.float32
    x, _ = sampler.next_batch()
    with torch.no_grad():
        ours = causal_lm_logits(model.eval(), x)
        theirs = loaded(input_ids=x).logits
    assert ours.shape == theirs.shape == (4, cfg.model.seq_len, 256)
    assert float((ours - theirs).abs().max()) <= 1e-6
    generated = loaded.generate(x[:1, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13) and torch.equal(generated[0, :8], x[0, :8])


def test_gpt_export_holds_theta_under_its_parameter_names(tmp_path):
    cfg = run_config("tiny", 256)
    model = build_model(cfg.model, 256, cfg.train.seed)
    first = save_checkpoint(tmp_path / "ck", cfg, model, outer_step=1)
    save_checkpoint(tmp_path / "ck", cfg, train(model, corpus_sampler(cfg.model.seq_len, 2), steps=2), outer_step=2)

    out = tmp_path / "step1"
    done = run_cli("swarm.export", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out), "--step", "1")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' owner-only
    tensors = load_file(out / "model.safetensors")
    names = [name for name, _ in global_parameters(model)]
    assert sorted(tensors) == sorted(names) and "head.weight" not in tensors  # tied to tok_emb.weight: once
    theta = checkpoint.load(first).state["theta_global"]
    assert torch.equal(torch.cat([tensors[name].reshape(-1) for name in names]), theta)
    assert model_sha256([theta]) == cfg.theta0_sha256  # step 1 is θ_0, not the newest
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(cfg.model)


def test_export_writes_the_run_tokenizer_as_transformers_files(tmp_path):
    text = corpus_text()[:200_000]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = swarm_data.tokenizer_from_json(bpe.to_str().encode("utf-8"))
    blob = tokenizer.to_json()  # what a peer keeps beside its checkpoint
    cfg = run_config("llama-tiny", tokenizer.vocab_size, tokenizer.sha256, tokenizer="file")
    save_checkpoint(tmp_path / "ck", cfg, build_model(cfg.model, tokenizer.vocab_size, cfg.train.seed), 1, blob)

    out = tmp_path / "export"
    done = run_cli("swarm.export", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs.model_max_length == cfg.model.seq_len
    sample_text = "ROMEO: But soft, what light through yonder window breaks?\n"
    ids = tokenizer.encode(sample_text).tolist()
    assert theirs(sample_text)["input_ids"] == ids and len(ids) < len(sample_text)
    assert theirs.decode(ids) == sample_text
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == tokenizer.vocab_size == 400


def test_export_refuses_bad_input_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    bad = run_cli("swarm.export", "--checkpoint-dir", str(empty), "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.splitlines() == [f"error: {empty}: empty, no checkpoint in it"]

    cfg = run_config("tiny", 256)
    step = save_checkpoint(tmp_path / "ck", cfg, build_model(cfg.model, 256, cfg.train.seed), outer_step=3)
    missing = run_cli("swarm.export", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out), "--step", "5")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'ck'}: no checkpoint of outer step 5 (steps held: 3)"]

    blob = bytearray((step / "state.bin").read_bytes())
    blob[100] ^= 1
    (step / "state.bin").write_bytes(blob)
    corrupt = run_cli("swarm.export", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out))
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    assert corrupt.stderr.splitlines()[-1] == f"error: {tmp_path / 'ck'}: no checkpoint that verifies (see the " \
                                              "warnings above)"
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    taken = run_cli("swarm.export", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out))
    assert taken.returncode == 2
    assert taken.stderr.splitlines() == [f"error: --out {out} exists and is not an empty directory: choose a new one"]
    assert os.listdir(out) == ["keep.txt"]
