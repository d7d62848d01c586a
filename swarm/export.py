"""``python -m swarm.export``: a run's verified model as files that other tools load without swarm.

``--checkpoint-dir DIR`` (the newest checkpoint that verifies, or ``--step N``'s) becomes ``--out OUT``:
for the transformers families (``llama``, ``hf``) what ``save_pretrained`` writes (config.json,
model.safetensors), so ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it and computes the very
logits swarm does; for ``gpt``, model.safetensors under the parameter names θ is made of, and a
config.json holding the run config's ``[model]`` section. A run with a tokenizer.json (bpe4k, file)
adds it as transformers tokenizer files (``AutoTokenizer.from_pretrained(OUT)``); the byte tokenizer
has none: its ids are the text's UTF-8 bytes. OUT appears whole or not at all: everything is written
to a temporary directory beside it, fsynced, then renamed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch.nn as nn

from swarm import checkpoint
from swarm.cli import run_command
from swarm.config import ConfigError, RunConfig
from swarm.evaluate import model_at
from swarm.fsutil import fsync_dir
from swarm.generate import from_checkpoint, run_tokenizer
from swarm.signature import global_parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swarm.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", required=True, metavar="DIR", help="a peer's --checkpoint-dir")
    p.add_argument("--out", required=True, metavar="OUT", help="directory to create (absent or empty)")
    p.add_argument("--step", type=int, metavar="N", help="export outer step N's checkpoint (default: the newest)")
    args = p.parse_args(argv)
    if args.step is not None and args.step < 0:
        p.error("--step must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return run_command(lambda: export(args))


def export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory: choose a new one")
    cfg, state, tokenizer_json = from_checkpoint(_checkpoint_path(Path(args.checkpoint_dir), args.step))
    tokenizer = run_tokenizer(cfg, tokenizer_json)
    model = model_at(cfg, tokenizer.vocab_size, state["theta_global"])
    _write_atomically(out, lambda tmp: _write(tmp, cfg, model, tokenizer_json))
    print(f"exported run {cfg.run_id!r} at outer step {state['outer_step']} ({cfg.model.family}, "
          f"{state['theta_global'].numel():,} parameters) to {out}")
    return 0


def _checkpoint_path(root: Path, step: int | None) -> Path:
    """``root`` itself, or its step-N directory, which must exist."""
    if step is None:
        return root
    path = root / f"step-{step:08d}"
    if not path.is_dir():
        have = ", ".join(str(int(p.name.removeprefix("step-"))) for p in checkpoint.step_dirs(root)) or "none"
        raise checkpoint.CheckpointError(f"{root}: no checkpoint of outer step {step} (steps held: {have})")
    return path


def _write(out: Path, cfg: RunConfig, model: nn.Module, tokenizer_json: bytes | None) -> None:
    """The model's files, and the tokenizer's where the run has a tokenizer.json, into the directory ``out``."""
    if cfg.model.family == "gpt":
        from safetensors.torch import save_file

        # named_parameters() lists a tied tensor once (the head shares tok_emb.weight), as safetensors requires
        save_file({name: p.detach().contiguous() for name, p in global_parameters(model)},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg.model), indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    else:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one shard: the command's own line says it is done
        model.save_pretrained(out)  # safetensors, and a config.json from_pretrained reads
    if tokenizer_json is not None:
        import tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=cfg.model.seq_len).save_pretrained(out)


def _write_atomically(out: Path, write) -> None:
    """Call ``write(tmp)`` on a fresh directory beside ``out``, fsync what it wrote, rename it to ``out`` (which
    is absent or empty; rename(2) refuses a directory that filled up meanwhile). Files get the modes the umask
    gives new files: safetensors writes its own owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
