"""Exit codes and one-line errors shared by every command:
0 clean, 2 bad arguments, config, data or checkpoint, 3 no initial peer reachable, 1 anything else."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from swarm.checkpoint import CheckpointError
from swarm.config import ConfigError
from swarm.data import DataError
from swarm.dht import UnreachableError

log = logging.getLogger("swarm")


def run_command(body: Callable[[], int], interrupted_code: int = 130, interrupted_message: str = "interrupted") -> int:
    """Run a command's body and turn whatever it raises into its exit code and one line on stderr."""
    try:
        return body()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UnreachableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(interrupted_message, file=sys.stderr)
        return interrupted_code
    except Exception as e:  # one line for people; -v (where a command has it) logs the traceback
        log.debug("fatal", exc_info=True)
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected failure'}",
              file=sys.stderr)
        return 1
