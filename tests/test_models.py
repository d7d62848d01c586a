"""Every model family: deterministic θ_0 (in this process and in another), exact sizes without weights, a loss
of ln(vocab) at init, and one sampler for all."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, peer_env
from helpers import GPT2_JSON, theta_sha256
from swarm.architectures import build_model, causal_lm_logits, causal_lm_loss, llama_ff, parameter_count, sample
from swarm.config import ConfigError, ModelConfig, load_profile
from swarm.signature import global_parameters

FAMILIES = {
    "gpt": load_profile("tiny").model,
    "llama": load_profile("llama-tiny").model,
    "hf": ModelConfig(family="hf", hf_config=GPT2_JSON, seq_len=64),
}
VOCAB = 256
# model_sha256 of the tiny profile's GPT at seed 0 as swarm built it before the families existed: a GPT run's
# θ_0 must not change under it.
TINY_GPT_SEED0_SHA256 = "bb712d8384c035854ffc5730374f4123f3bf3d0db186f638694cef1fad016d14"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_builds_the_same_model_from_the_same_seed(family):
    cfg = FAMILIES[family]
    rng_before = torch.random.get_rng_state()
    first, again, other = (build_model(cfg, VOCAB, seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert theta_sha256(first) == theta_sha256(again) != theta_sha256(other)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in first.parameters())
    assert first.training
    assert parameter_count(cfg, VOCAB) == sum(p.numel() for _, p in global_parameters(first))


def test_gpt_theta0_is_what_swarm_always_built():
    assert theta_sha256(build_model(FAMILIES["gpt"], VOCAB, 0)) == TINY_GPT_SEED0_SHA256


BUILD_SCRIPT = """
import json, sys
from swarm.architectures import build_model
from swarm.config import ModelConfig
from swarm.signature import global_parameters, model_sha256
cfgs, vocab_size = json.loads(sys.argv[1]), int(sys.argv[2])
models = {family: build_model(ModelConfig(**cfg), vocab_size, 0) for family, cfg in cfgs.items()}
print(json.dumps({family: model_sha256([p for _, p in global_parameters(m)]) for family, m in models.items()}))
"""


def test_another_process_builds_the_same_bytes():
    cfgs = json.dumps({family: dataclasses.asdict(cfg) for family, cfg in FAMILIES.items()})
    env = dict(peer_env(), OMP_NUM_THREADS="2")  # another thread count than the test process's own
    out = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, cfgs, str(VOCAB)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    here = {family: theta_sha256(build_model(cfg, VOCAB, 0)) for family, cfg in FAMILIES.items()}
    assert json.loads(out.stdout) == here


def test_llama_is_sized_by_the_profile():
    model = build_model(FAMILIES["llama"], VOCAB, 0)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (2, 4, 2, 64)
    assert (c.intermediate_size, c.max_position_embeddings, c.vocab_size) == (192, 64, VOCAB)
    assert c._attn_implementation == "sdpa"
    assert (llama_ff(64), llama_ff(512), llama_ff(96)) == (192, 1408, 256)
    explicit = build_model(dataclasses.replace(FAMILIES["llama"], d_ff=100, n_kv_head=0), VOCAB, 0)
    assert (explicit.config.intermediate_size, explicit.config.num_key_value_heads) == (100, 4)


def test_hf_family_takes_the_tokenizer_vocabulary_and_builds_fp32():
    model = build_model(FAMILIES["hf"], 300, 0)
    assert model.config.vocab_size == 300 and model.get_input_embeddings().weight.shape == (300, 32)
    assert model.config.model_type == "gpt2" and next(model.parameters()).dtype == torch.float32
    assert parameter_count(FAMILIES["hf"], 300) == sum(p.numel() for p in model.parameters())


def test_profiles_parameter_counts():
    assert parameter_count(load_profile("llama-tiny").model, 256) == 131_392
    assert parameter_count(load_profile("llama-20m").model, 4096) == 21_895_680
    assert parameter_count(load_profile("tiny").model, 256) == 445_952


def test_custom_family_has_no_builder():
    custom = ModelConfig(family="custom")
    for call in (lambda: build_model(custom, VOCAB, 0), lambda: parameter_count(custom, VOCAB)):
        with pytest.raises(ConfigError, match="swarm has no builder"):
            call()


def test_hf_config_transformers_cannot_build_is_a_config_error():
    unknown = ModelConfig(family="hf", hf_config='{"model_type":"no-such-model"}')
    with pytest.raises(ConfigError, match="transformers cannot build a config"):
        build_model(unknown, VOCAB, 0)
    encoder_only = ModelConfig(family="hf", hf_config='{"model_type":"vit"}')
    with pytest.raises(ConfigError, match="cannot build a 'vit' causal language model"):
        build_model(encoder_only, VOCAB, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_at_init_is_about_ln_vocab(family):
    cfg = FAMILIES[family]
    model = build_model(cfg, VOCAB, 0)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, VOCAB, (4, cfg.seq_len), generator=gen) for _ in range(2))
    logits = causal_lm_logits(model, x)
    assert logits.shape == (4, cfg.seq_len, VOCAB) and logits.dtype == torch.float32
    loss = causal_lm_loss(model, x, y).detach()
    assert math.isfinite(float(loss)) and abs(float(loss) - math.log(VOCAB)) < 0.05
    if family == "gpt":  # the one loss equals the GPT's own, bit for bit
        assert torch.equal(loss, model(x, y)[1].detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_returns_the_requested_tokens(family):
    cfg = FAMILIES[family]
    model = build_model(cfg, VOCAB, 0)
    prompt = torch.tensor([[72, 105, 33]])
    # a prompt longer than the context: only its last seq_len tokens are seen, as in training
    long_prompt = torch.randint(0, VOCAB, (1, cfg.seq_len + 10), generator=torch.Generator().manual_seed(1))
    draws = [sample(model, p, 12, 0.8, top_k, torch.Generator().manual_seed(5), context=cfg.seq_len)
             for p, top_k in ((prompt, 40), (prompt, 40), (prompt, None), (long_prompt, 1))]
    assert [d.shape for d in draws] == [(1, 12)] * 4
    assert all(0 <= int(d.min()) and int(d.max()) < VOCAB for d in draws)
    assert torch.equal(draws[0], draws[1])  # same generator seed, same tokens
    assert model.training  # sampled in eval mode, handed back as it came
    greedy = draws[3][0, 0]
    assert int(greedy) == int(causal_lm_logits(model.eval(), long_prompt[:, -cfg.seq_len:])[0, -1].argmax())
