"""Held-out validation loss: one measurement that every benchmark and variant shares.

The validation split is the tail that ``swarm.data.split_tokens`` never lets a peer train on.
Windows are drawn once from a fixed seed, so two models evaluated with the same arguments see
exactly the same tokens and their losses differ only by what the models learned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from swarm import data as swarm_data
from swarm.architectures import build_model
from swarm.config import RunConfig
from swarm.signature import check_model, load_flat


@torch.no_grad()
def validation_loss(model: nn.Module, tokens: np.ndarray, seq_len: int, batches: int, batch_size: int,
                    seed: int) -> float:
    """Mean cross-entropy (nats per token) of ``model`` over ``batches`` x ``batch_size`` fixed windows of
    ``tokens``; the same seed gives the same windows. The model is left in the mode it was in."""
    sampler = swarm_data.BatchSampler(tokens, seq_len, batch_size, seed)
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for _ in range(batches):
            x, y = sampler.next_batch()
            _, loss = model(x, y)
            total += float(loss)
    finally:
        model.train(was_training)
    return total / batches


def corpus_split(cfg: RunConfig) -> tuple[swarm_data.Tokenizer, np.ndarray, np.ndarray]:
    """(tokenizer, train tokens, held-out tokens) of the embedded corpus, exactly as a peer of ``cfg`` derives
    them (and cached where the peers cache them, so peers started afterwards find them ready)."""
    corpus = swarm_data.load_corpus(None)
    tokenizer = swarm_data.build_tokenizer(cfg.model.tokenizer, corpus)
    cache_dir = swarm_data.default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    train, val = swarm_data.split_tokens(swarm_data.prepare_tokens(corpus, tokenizer, cache_dir))
    return tokenizer, train, val


def model_at(cfg: RunConfig, vocab_size: int, theta: torch.Tensor) -> nn.Module:
    """The run's model with its parameters set from a flat fp32 θ (a checkpoint's ``theta_global``). A model whose
    parameters differ from the ones the run averages (another transformers version naming them otherwise) is
    refused with a ConfigError naming the first difference, rather than filled with values that mean something
    else."""
    model = build_model(cfg.model, vocab_size, cfg.train.seed)
    check_model(cfg, model)
    return load_flat(model, theta)
