"""swarm: peers on slow, unreliable links train one language model together with DiLoCo.

Use it from Python around your own training loop (``swarm.DiLoCo``, ``swarm.Validation``), or as
``python -m swarm.peer``. The code is organised as one outer step flows (docs/architecture.md draws it):

* ``api``         ``DiLoCo``: the peer around a user's model and optimizer; ``peer`` is the CLI over it.
* ``membership``  start our DHT node and find (or start) the run; ``config`` the run config and profiles.
* ``rounds``      the outer loop: one typed outcome per round (averaged, carried, resynced, rolled back).
* ``diloco``      θ_global, the outer momentum, Δ and the bit-identical outer Nesterov step.
* ``node``        the network thread; ``liveness`` our record and the view of everyone else's; ``dht`` the
                  only door to hivemind's DHT; ``reachability`` the dial-back test for peers behind NAT.
* ``matchmaking`` groups per round, without livelock or DHT polling; ``averaging`` the all-reduce of Δ:
                  byte-identical results, hostile contributions refused or clipped, failures blamed honestly.
* ``compression`` the int8 codec; ``caps`` every wait's cap.
* ``holder``      after each outer step: describe θ_global, serve and announce it (``manifest``), save it
                  (``checkpoint``); ``adoption`` which of the swarm's states a peer may take.
* ``signature``   which tensors are averaged, and ``model_sha256``; ``validation`` the loss check hook.
* ``model`` our GPT; ``architectures`` every model family (GPT, Hugging Face); ``data`` corpora, tokenizers,
  shards; ``inner`` the CLI's inner loop; ``device`` and ``memory`` checks before training starts.
* ``wire`` framing and size limits for our own streams; ``fsutil`` crash-safe writes.
* ``metrics`` JSON-lines events; ``dashboard`` the live page; ``status`` the swarm in a terminal;
  ``generate`` text from a verified model; ``export`` a checkpoint as safetensors; ``launch`` a local
  swarm; ``bootstrap`` a bare DHT node.
"""

__version__ = "0.2.0"


def __getattr__(name: str):
    """``swarm.DiLoCo`` and ``swarm.Validation`` without importing torch and hivemind on ``import swarm``."""
    if name == "DiLoCo":
        from swarm.api import DiLoCo

        return DiLoCo
    if name == "Validation":
        from swarm.validation import Validation

        return Validation
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
