"""A user's own training loop around ``swarm.DiLoCo``, as a separate process: ``python tests/api_peer.py``.

The model is a plain ``nn.Module`` (not one swarm knows) whose loss is ``Σ c·θ`` with c = rank + 1, so each
inner SGD step moves θ by exactly -lr·c and every pseudo-gradient is known in advance. Rank 0 starts the run
(fp32 on the wire, round 1 waits for both peers); rank 1 joins it with an unseeded model of its own, so its
θ_0 must come from rank 0. After each averaged round the script saves θ to ``OUT/rank<R>-step<K>.pt``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.nn as nn

import swarm
from swarm.config import ModelConfig, RunConfig, SwarmConfig, TrainConfig
from swarm.rounds import Averaged

INNER_STEPS, INNER_LR, SAMPLES = 5, 0.01, 4


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(300))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, c: float) -> torch.Tensor:
        return (self.w * c).sum() + (self.b * c).sum()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--outer-steps", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(1000 + args.rank)  # not the same θ on both: rank 1 must take rank 0's θ_0
    model = Plain()
    inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    config = RunConfig(run_id="api-test", profile="api", model=ModelConfig(family="custom"),
                       train=TrainConfig(inner_steps=INNER_STEPS, outer_lr=0.7, outer_momentum=0.9),
                       swarm=SwarmConfig(codec="fp32", heartbeat_s=0.5, gather_timeout_s=20, min_peers=2,
                                         min_peers_timeout_s=60))
    with swarm.DiLoCo(model, inner, run_id="api-test", initial_peers=args.initial_peers,
                      inner_steps=INNER_STEPS, config=None if args.initial_peers else config,
                      host_maddrs=["/ip4/127.0.0.1/tcp/0"], metrics_file=f"{args.out}/rank{args.rank}.jsonl",
                      max_outer_steps=args.outer_steps, reachable="yes",
                      on_joined=lambda dl: print(f"join with --initial-peers {dl.join_addresses()[0]}", flush=True)
                      ) as dl:
        while not dl.done:
            loss = model(float(args.rank + 1))
            loss.backward()
            inner.step()
            inner.zero_grad()
            outcome = dl.step(samples=SAMPLES, loss=loss.item())
            if isinstance(outcome, Averaged):
                flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                torch.save(flat, f"{args.out}/rank{args.rank}-step{outcome.outer_step}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
