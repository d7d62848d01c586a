"""``--device auto|cpu|cuda|cuda:N``: where the model trains. θ_global and the outer step stay on the CPU."""

from __future__ import annotations

import torch

from swarm.config import ConfigError


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names, checked usable (a tiny allocation); ConfigError, one line, if not."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {spec!r}: swarm trains on cpu or cuda devices")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no usable GPU"
        raise ConfigError(f"--device {spec}: this torch ({torch.__version__}) is {build}; see the README to install "
                          f"a CUDA build, or use --device cpu")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices")
    try:
        torch.zeros(1, device=torch.device("cuda", index)).sum().item()
    except RuntimeError as e:
        raise ConfigError(f"--device {spec}: the GPU is not usable: {str(e).splitlines()[0]}") from None
    return torch.device("cuda", index)
