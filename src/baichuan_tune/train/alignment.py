"""Setup shared by the alignment commands (rm, dpo, ppo): where the model came from, the demo pairs."""

from __future__ import annotations

from pathlib import Path

from ..io_utils import atomic_write_json


def model_reference(name: str) -> str:
    """How to find cfg.model again later: 'default' stays a name, a folder becomes an absolute path."""
    from ..models.checkpoint import resolve_model_path

    return name if name == "default" else str(resolve_model_path(name).resolve())


def write_demo_pairs(out: Path) -> str:
    """Write the built-in preference pairs into the run folder (so the run's data can be inspected)."""
    from ..data.builtin_pref import demo_preference_records

    path = Path(out) / "demo_pairs.json"
    atomic_write_json(path, demo_preference_records())
    return str(path)
