"""What the benchmark commands share: the namespace preflight, output folders, the JSON + plot
they write, and the finishing touches of their figures."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from bench.netns import cleanup_leftovers, missing_requirements


def netns_preflight(name: str) -> int | None:
    """None when network namespaces can be built here (after removing any a killed run left behind);
    otherwise says why on stderr and returns the exit code, 2."""
    problem = missing_requirements()
    if problem:
        print(f"{name}: {problem}", file=sys.stderr)
        return 2
    cleanup_leftovers()
    return None


def make_parents(*paths: str) -> None:
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(data: Any, path: str) -> None:
    make_parents(path)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_results(rows: list[dict], json_path: str, plot_path: str, plot: Callable[[list[dict], str], None]) -> None:
    """The rows as JSON and as a figure; nothing when no setting finished."""
    if rows:
        write_json(rows, json_path)
        plot(rows, plot_path)


def finish_figure(fig, path: str, axes=(), title: str | None = None) -> None:
    """Grid and legend on ``axes``, the title, then save ``fig`` to ``path``."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
