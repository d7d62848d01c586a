"""swarm: peers on slow, unreliable links train one language model together with DiLoCo.

The code is organised as one outer step flows (shared/DESIGN.md draws it):

* ``peer``     the CLI; wires the pieces below and runs the outer loop.
* ``config``   the run config: a TOML profile, published once in the DHT, checked by joiners.
* ``dht``      the only door to hivemind's DHT: bootstrap, key names, typed records.
* ``node``     the network thread: liveness records and every protocol we serve.
* ``data``     the embedded corpus (or ``--data``), tokenizers, per-peer shards.
* ``model``    the GPT and ``model_sha256``, the hash that proves replicas agree.
* ``diloco``   H inner AdamW steps, the pseudo-gradient Δ, the outer Nesterov step.
* ``compression``  our int8 blockwise codec for Δ on the wire.
* ``matchmaking``  deterministic group formation for an outer step, retried without failed peers.
* ``averaging``    the all-reduce of Δ: byte-identical results, hostile contributions refused or clipped.
* ``holder``   after each outer step: pack θ_global, serve and announce it (``manifest``), save it
               (``checkpoint``, atomic, verified on load).
* ``manifest`` manifests in the DHT and verified multi-source chunk download for late joiners.
* ``wire``     framing and size limits for our own libp2p streams; ``fsutil`` crash-safe writes.
* ``metrics``  JSON-lines events; ``dashboard`` the live web page; ``status`` the swarm in a terminal;
  ``generate`` text from a verified model; ``launch`` a local swarm; ``bootstrap`` a bare DHT node.
"""

__version__ = "0.1.0"
