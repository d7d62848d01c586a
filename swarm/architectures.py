"""Every model family a run can train, behind one interface: build, forward, loss, size, sample.

``build_model`` turns a run's ``ModelConfig`` into its initial module: swarm's own GPT (``gpt``),
transformers' LlamaForCausalLM sized by the profile (``llama``) or any transformers causal LM from a
``config.json`` (``hf``). It builds on the CPU in fp32 from the run's seed inside a forked RNG, so
every peer starts from the same θ_0, byte for byte, and proves it with ``theta0_sha256``
(docs/architecture.md, "Byte-identical replicas"). transformers is imported only for its families:
a GPT run does not pay for it.

Attention of the transformers families is "sdpa" (torch's scaled_dot_product_attention, "eager" for
an architecture without it): it is what swarm's GPT uses, it is what ``from_pretrained`` picks, so an
exported model computes the very same logits, and its CPU kernel reduces in a fixed order, so a
forward and backward give the same bits run after run and with any number of threads.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from swarm.config import ConfigError, ModelConfig
from swarm.model import GPT

FF_MULTIPLE = 64  # llama: d_ff defaults to 8/3 d_model rounded up to this


def build_model(cfg: ModelConfig, vocab_size: int, seed: int) -> nn.Module:
    """The run's initial model, fp32 on the CPU, in training mode: identical on every peer for the same config,
    vocabulary and seed. The caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct(cfg, vocab_size).train()


def parameter_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Values in θ (tied tensors once), from a build on the meta device: no memory for the weights, so a peer
    can estimate what it needs before it starts anything."""
    with torch.device("meta"):
        model = _construct(cfg, vocab_size)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def llama_ff(d_model: int) -> int:
    """Llama's default MLP width: about 8/3 d_model (the SwiGLU size of the same cost as a 4 d_model MLP),
    rounded up to a multiple of FF_MULTIPLE."""
    return -(-8 * d_model // (3 * FF_MULTIPLE)) * FF_MULTIPLE


def causal_lm_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) for the token ids ``x`` (B, T), whatever the family. A transformers model runs
    without its key/value cache (training and scoring need none); any other module is called as ``model(x)``
    and returns the logits, or a tuple whose first item they are (swarm's GPT)."""
    if _is_transformers(model):
        return model(input_ids=x, use_cache=False).logits
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def causal_lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per token; ``y`` is already shifted: y[:, t] is the token after x[:, t]."""
    logits = causal_lm_logits(model, x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, temperature: float, top_k: int | None,
           generator: torch.Generator | None, context: int) -> torch.Tensor:
    """``new_tokens`` ids (B, new_tokens) sampled after the prompt (B, T), each from the last ``context`` tokens
    (the run's seq_len: longer windows were never trained). ``top_k``: sample among the k likeliest (None: all).
    The prompt and the generator live on the model's device. The model runs in eval mode (no dropout) and is left
    in the mode it was in."""
    ids = prompt_ids
    was_training = model.training
    model.eval()
    try:
        for _ in range(new_tokens):
            logits = causal_lm_logits(model, ids[:, -context:])[:, -1, :].float() / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        model.train(was_training)
    return ids[:, prompt_ids.shape[1]:]


def _construct(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The module of ``cfg``'s family with the current RNG and default device (a real or a meta build)."""
    if cfg.family == "gpt":
        return GPT(cfg, vocab_size)
    if cfg.family == "llama":
        return _transformers_model(_llama_config(cfg, vocab_size))
    if cfg.family == "hf":
        return _transformers_model(_hf_config(cfg.hf_config, vocab_size))
    raise ConfigError(f"model.family {cfg.family!r} is a module only the Python API user who trains it can build: "
                      f"swarm has no builder for it")


def _llama_config(cfg: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    # No bos/eos/pad ids: swarm's tokenizers have no special tokens, and transformers' generate() would
    # otherwise stop at whatever text token happens to have id 2.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=cfg.d_ff or llama_ff(cfg.d_model), num_hidden_layers=cfg.n_layer,
                       num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                       max_position_embeddings=cfg.seq_len, rope_theta=cfg.rope_theta,
                       attention_dropout=cfg.dropout, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _hf_config(config_json: str, vocab_size: int):
    """The transformers config of an ``hf`` run, its vocabulary the tokenizer's: special-token ids outside it
    (those of the tokenizer the config.json was written for) are dropped rather than left to index nothing."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(**json.loads(config_json))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.config_json: transformers cannot build a config from it: "
                          f"{str(e).splitlines()[0][:200]}") from None
    config.vocab_size = vocab_size
    for name, value in config.to_dict().items():
        if name.endswith("_token_id") and isinstance(value, int) and not 0 <= value < vocab_size:
            setattr(config, name, None)
    return config


def _transformers_model(config) -> nn.Module:
    """A transformers causal LM of ``config``, initialised by its own ``_init_weights`` from the current RNG, in
    fp32 whatever dtype the config names. ``attn_implementation=None`` is transformers' default, "sdpa" where
    the architecture has it and "eager" elsewhere, whatever the config asks: what ``from_pretrained`` picks."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=None)
    except ValueError as e:  # a config.json of no causal LM, or sizes its architecture refuses
        raise ConfigError(f"model: transformers cannot build a {config.model_type!r} causal language model: "
                          f"{str(e).splitlines()[0][:200]}") from None


def _is_transformers(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model; if transformers was never imported, it cannot be one."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
