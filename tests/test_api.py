"""The Python API around users' own loops: a plain nn.Module in two processes, values known in advance; and
what becomes of a round's samples when it cannot be averaged."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn as nn

import swarm
from swarm import int4
from swarm.config import ModelConfig, RunConfig, SwarmConfig, TrainConfig
from swarm.manifest import pack_state
from swarm.metrics import read_events
from swarm.rounds import Averaged, Carried

import helpers
from helpers import ROOT, outer_by_step, peer_env, stop, wait_for

INNER_STEPS, INNER_LR, SAMPLES = 5, 0.01, 4  # as tests/api_peer.py


def start_api_peer(rank: int, out, initial_peers: list[str]) -> subprocess.Popen:
    log = open(out / f"rank{rank}.log", "w")
    return subprocess.Popen([sys.executable, "tests/api_peer.py", "--rank", str(rank), "--out", str(out),
                             "--initial-peers", *initial_peers], stdout=log, stderr=subprocess.STDOUT,
                            env=peer_env(), cwd=ROOT, start_new_session=True)


def test_two_processes_with_their_own_loop_average_a_plain_module(tmp_path):
    first = start_api_peer(0, tmp_path, [])
    try:
        line = wait_for(lambda: [x for x in (tmp_path / "rank0.log").read_text().splitlines()
                                 if x.startswith("join with --initial-peers ")], 90, "rank 0's address")
        second = start_api_peer(1, tmp_path, [line[0].split()[-1]])
        try:
            assert second.wait(timeout=180) == 0, (tmp_path / "rank1.log").read_text()[-3000:]
        finally:
            stop(second)
        assert first.wait(timeout=60) == 0, (tmp_path / "rank0.log").read_text()[-3000:]
    finally:
        stop(first)
    events = [outer_by_step(tmp_path / f"rank{r}.jsonl") for r in range(2)]
    assert sorted(events[0]) == sorted(events[1]) == [1, 2, 3]
    boot = read_events(str(tmp_path / "rank1.jsonl"), "bootstrap")
    assert boot and boot[0]["outer_step"] == 0  # rank 1's own random θ was replaced by the run's θ_0
    # θ_0 is rank 0's model as seeded by tests/api_peer.py; every round both ranks' Δ is H·lr·(rank + 1)
    torch.manual_seed(1000)
    theta = torch.cat([torch.randn(300), torch.randn(5)])
    momentum = torch.zeros_like(theta)
    delta = torch.full_like(theta, INNER_STEPS * INNER_LR * 1.5)  # the mean of 1 and 2 steps of c
    for step in (1, 2, 3):
        momentum = 0.9 * momentum + delta
        theta = theta - 0.7 * (delta + 0.9 * momentum)
        got = [torch.load(tmp_path / f"rank{r}-step{step}.pt") for r in range(2)]
        assert torch.equal(got[0], got[1])  # byte-identical on both members
        assert torch.allclose(got[0], theta, atol=1e-5), (step, (got[0] - theta).abs().max())
        assert events[0][step]["model_sha256"] == events[1][step]["model_sha256"]
        assert events[0][step]["group_size"] == 2 and events[0][step]["weights"] == [INNER_STEPS * SAMPLES] * 2


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc(x)


def test_a_round_that_cannot_be_averaged_carries_its_samples_into_the_next(tmp_path):
    """Round 1 is stale (another peer announces outer step 1) but the state it serves fails the loss check: nothing
    is adopted, Δ is kept, and round 2's average weighs the samples of both rounds."""
    model = Linear()
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(1)
    batches = lambda: (torch.randn(32, 16, generator=data), torch.randn(32, 1, generator=data))  # noqa: E731
    validation = swarm.Validation(batches, lambda m, b: float(((m(b[0]) - b[1]) ** 2).mean()))
    config = RunConfig(run_id="carry", profile="api", model=ModelConfig(family="custom"),
                       train=TrainConfig(inner_steps=INNER_STEPS), swarm=SwarmConfig(heartbeat_s=0.5))
    with swarm.DiLoCo(model, inner, config=config, validation=validation, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                      metrics_file=str(tmp_path / "m.jsonl"), reachable="yes") as dl:
        liar = helpers.start_nodes(1, "carry", config.swarm, round=2, training=2, state="training",
                                   initial=dl.join_addresses()[:1])[0]
        try:
            noise = torch.randn(dl.outer.numel) * 100  # a state far worse than ours on any batch
            liar.hold(*pack_state("carry", {"outer_step": 1, "theta_global": noise,
                                            "momentum": torch.zeros_like(noise)}))
            liar.flush_status()
            wait_for(lambda: liar.peer_id in dl.node.live_peers(fresh=True), 30, "the liar in the view")
            outcomes = []
            for _ in range(2 * INNER_STEPS):
                x, y = batches()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                inner.step()
                inner.zero_grad()
                outcome = dl.step(samples=SAMPLES, loss=float(loss))
                if outcome is not None:
                    outcomes.append(outcome)
        finally:
            liar.close()
    assert [type(o) for o in outcomes] == [Carried, Averaged]
    assert outcomes[0].samples == INNER_STEPS * SAMPLES
    assert outcomes[1].result.group.weights == (2.0 * INNER_STEPS * SAMPLES,)  # both rounds' samples, once
    outer = read_events(str(tmp_path / "m.jsonl"), "outer")
    assert [(e["outer_step"], e["samples"]) for e in outer] == [(1, 2 * INNER_STEPS * SAMPLES)]
    assert not read_events(str(tmp_path / "m.jsonl"), "bootstrap")  # the liar's state was never adopted


def test_int4_carries_what_a_round_did_not_send_into_the_next_and_checkpoints_it(tmp_path):
    """Error feedback: a round sends v = Δ + e, and e becomes v minus what the owners received of it (the codec's
    own round trip); a restart from the checkpoint finds the same e."""
    model, data = Linear(), torch.Generator().manual_seed(1)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    config = RunConfig(run_id="ef", profile="api", model=ModelConfig(family="custom"),
                       train=TrainConfig(inner_steps=INNER_STEPS),
                       swarm=SwarmConfig(codec="int4", block_size=8, heartbeat_s=0.5))
    options = dict(config=config, host_maddrs=["/ip4/127.0.0.1/tcp/0"], reachable="yes",
                   checkpoint_dir=str(tmp_path / "ck"))
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # noqa: E731
    residual = torch.zeros(17)
    with swarm.DiLoCo(model, inner, **options) as dl:
        for _ in range(2):
            theta_global = flat().clone()  # θ_local starts each round at θ_global
            for _ in range(INNER_STEPS):
                x, y = torch.randn(32, 16, generator=data), torch.randn(32, 1, generator=data)
                ((model(x) - y) ** 2).mean().backward()
                inner.step()
                inner.zero_grad()
                v = theta_global - flat() + residual
                outcome = dl.step(samples=SAMPLES)
            assert isinstance(outcome, Averaged)
            residual = v - int4.decode(int4.encode(v, 8), v.numel(), 8)
            assert residual.abs().max() > 0 and torch.equal(dl.rounds.feedback.residual, residual)
    restarted = Linear()
    with swarm.DiLoCo(restarted, torch.optim.SGD(restarted.parameters(), lr=0.01), **options) as dl:
        assert dl.outer_step == 2 and torch.equal(dl.rounds.feedback.residual, residual)


def test_the_hugging_face_example_trains_as_the_readme_shows(tmp_path):
    result = subprocess.run([sys.executable, "examples/train_hf.py", "--outer-steps", "2"], capture_output=True,
                            text=True, timeout=240, env=peer_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "others join with: python examples/train_hf.py --initial-peers /ip4/" in result.stdout
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in result.stderr.splitlines() if ": group " in line]
    assert len(losses) == 2 and losses[1] < losses[0]
