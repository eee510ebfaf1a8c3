"""The demo figures the docs quote (docs/demo_figures.json, written by scripts/demo_figures.py), for the demo
tests to compare with what they measure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = json.loads((ROOT / "docs" / "demo_figures.json").read_text(encoding="utf-8"))
# How far a run may land from the documented figures: another thread count or CPU changes float sums, and
# the tiny demo models turn that into a few pairs (of 80) or prompts (of 32) judged otherwise.
ACCURACY_TOLERANCE = 0.07
REWARD_TOLERANCE = 0.12


def script():
    """scripts/demo_figures.py as a module (it renders the docs' blocks from FIGURES)."""
    spec = importlib.util.spec_from_file_location("demo_figures", ROOT / "scripts" / "demo_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_near(measured: dict, command: str, absolute: dict[str, float] = {}, relative: dict[str, float] = {}):
    """Each key's measured value lies within its absolute tolerance, or its relative one (a share of the
    documented value), of the figure the docs quote for `command`."""
    documented = FIGURES[command]
    limits = {**{k: t for k, t in absolute.items()}, **{k: t * abs(documented[k]) for k, t in relative.items()}}
    off = {k: (measured[k], documented[k]) for k, limit in limits.items() if abs(measured[k] - documented[k]) > limit}
    assert not off, f"{command}: (measured, documented in docs/demo_figures.json) {off}"
