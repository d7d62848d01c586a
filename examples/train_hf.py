"""Train a Hugging Face causal LM with your own loop, together with a swarm (docs: README, "Python API").

    python examples/train_hf.py                                   # start a run; it prints how others join
    python examples/train_hf.py --initial-peers /ip4/.../p2p/...  # join it from another terminal or machine
"""

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import swarm
from swarm import data

p = argparse.ArgumentParser()
p.add_argument("--initial-peers", nargs="*", default=[])
p.add_argument("--outer-steps", type=int, default=20)
args = p.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

# your data: here the embedded corpus as bytes; any tokenized text works
corpus = data.load_corpus(None)
tokens = torch.from_numpy(data.prepare_tokens(corpus, data.build_tokenizer("byte", corpus), "/tmp").astype("int64"))
windows = tokens[: len(tokens) // 65 * 65].view(-1, 65)
loader = torch.utils.data.DataLoader(windows, batch_size=8, shuffle=True)

# your model: built from a config, nothing downloaded; peers that join take the run's θ_0 from its first peer
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = AutoModelForCausalLM.from_config(config)
inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda step: min(1.0, (step + 1) / 100))


def loss_on(model, batch):
    return model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss


# the swarm scores states other peers serve on batches only this peer draws, before adopting one
held_out = torch.utils.data.DataLoader(windows, batch_size=16, shuffle=True)
validation = swarm.Validation(lambda: next(iter(held_out)), lambda m, b: float(loss_on(m, b)))

with swarm.DiLoCo(model, inner, run_id="hf-example", initial_peers=args.initial_peers, inner_steps=50,
                  scheduler=schedule, validation=validation, max_outer_steps=args.outer_steps,
                  on_joined=lambda dl: print("others join with: python examples/train_hf.py --initial-peers",
                                             dl.join_addresses()[0], flush=True)) as dl:
    while not dl.done:
        for batch in loader:
            loss = loss_on(model, batch)
            loss.backward()
            inner.step()
            schedule.step()
            inner.zero_grad()
            dl.step(samples=len(batch), loss=loss.item(), tokens=batch.numel())
            if dl.done:
                break
