"""Will the model fit? An estimate from the run config, made before any network starts.

A peer holds, per parameter: θ_local, its gradient and AdamW's two moments (16 bytes, on the training
device), θ_global, the outer momentum and Δ (12 bytes, on the CPU), and Δ's encoding on the wire
(at most 4 bytes). Activations add, per layer, about 34·d_model·seq_len·batch bytes, and the logits
12·vocab·seq_len·batch (fp32, with their gradient and softmax). A model that cannot fit in the memory
available (MemAvailable, or the cgroup limit where lower) is refused with one line, instead of
dying of an allocator error minutes later.
"""

from __future__ import annotations

from swarm.config import ConfigError, RunConfig

PROCESS_BYTES = 600 << 20  # torch, hivemind and the DHT and p2pd processes, before any tensor


def estimate_bytes(cfg: RunConfig, params: int, vocab_size: int) -> tuple[int, int]:
    """(bytes on the training device, bytes on the CPU for the outer state and the process) for ``cfg``."""
    m, t = cfg.model, cfg.train
    activations = t.batch_size * m.seq_len * (34 * m.d_model * m.n_layer + 12 * vocab_size)
    return 16 * params + activations, 16 * params + PROCESS_BYTES


def available_bytes() -> int | None:
    """MemAvailable, or the cgroup's memory limit where that is lower; None if neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = open(path).read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            found.append(int(value))
    return min(found) if found else None


def check_fits(cfg: RunConfig, params: int, vocab_size: int, on_gpu: bool, gpu_bytes: int | None = None) -> None:
    """ConfigError naming the estimate and what is available, if the model cannot fit."""
    device, host = estimate_bytes(cfg, params, vocab_size)
    cpu_need = host + (0 if on_gpu else device)
    available = available_bytes()
    if available is not None and cpu_need > available:
        raise ConfigError(f"the {cfg.profile} model ({params / 1e6:,.1f}M parameters) needs about "
                          f"{cpu_need / 2**30:,.1f} GiB of memory, and {available / 2**30:,.1f} GiB are available")
    if on_gpu and gpu_bytes is not None and device > gpu_bytes:
        raise ConfigError(f"the {cfg.profile} model ({params / 1e6:,.1f}M parameters) needs about "
                          f"{device / 2**30:,.1f} GiB on the GPU, which has {gpu_bytes / 2**30:,.1f} GiB")
