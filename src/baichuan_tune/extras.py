"""The optional dependencies (pyproject.toml's extras), checked when a command starts, before any model loads.

A plain `pip install baichuan-tune` leaves them out; a run that needs one would otherwise fail at the
first import of it, which for the loss plot is after the whole training. `check_extras(command, cfg)` is
called by every command right after its options are read: it works out from the options which optional
modules the run will import and raises one MissingDependencyError naming the missing ones, what needs
them, and the pip command that installs them.
"""

from __future__ import annotations

import importlib

from .errors import MissingDependencyError

# import name -> the extra of pyproject.toml that installs it
EXTRA_OF = {"matplotlib": "train", "tensorboard": "train", "bitsandbytes": "quant", "fastapi": "serve",
            "uvicorn": "serve"}
# what a command needs whatever its options say
COMMAND_NEEDS = {"serve": [("fastapi", ""), ("uvicorn", "")], "webui": [("fastapi", ""), ("uvicorn", "")]}
# a command whose own needs come with an extra named after it (`webui` needs what `serve` does, as [webui])
COMMAND_EXTRA = {"webui": "webui"}


def run_needs(command: str, cfg) -> list[tuple[str, str]]:
    """(module, what needs it) for every optional module a run of `command` with options `cfg` will import."""
    needs = list(COMMAND_NEEDS.get(command, []))
    if getattr(cfg, "plot_loss", False):
        needs.append(("matplotlib", "for the loss plots; --plot_loss false goes without"))
    if getattr(cfg, "report_to", None) == "tensorboard":
        needs.append(("tensorboard", "for the TensorBoard logs; --report_to none goes without"))
    if getattr(cfg, "finetuning_type", None) == "qlora":
        needs.append(("bitsandbytes", "for --finetuning_type qlora"))
    if getattr(cfg, "optim", "adamw_torch") != "adamw_torch":
        needs.append(("bitsandbytes", f"for --optim {cfg.optim}"))
    # A training config's quantization_bit only matters under qlora (checked above).
    if getattr(cfg, "quantization_bit", None) and not hasattr(cfg, "finetuning_type"):
        needs.append(("bitsandbytes", f"for --quantization_bit {cfg.quantization_bit}"))
    return needs


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_extras(command: str, cfg=None) -> None:
    """Raise MissingDependencyError, before any work, when a module the run will import is not installed."""
    missing: dict[str, list[str]] = {}
    for module, why in run_needs(command, cfg):
        if module in missing or not _importable(module):
            missing.setdefault(module, [])
            if why and why not in missing[module]:
                missing[module].append(why)
    if not missing:
        return
    names = [m + (f" ({', '.join(why)})" if why else "") for m, why in missing.items()]
    own = {m for m, _ in COMMAND_NEEDS.get(command, [])}
    extras = ",".join(sorted({COMMAND_EXTRA.get(command, EXTRA_OF[m]) if m in own else EXTRA_OF[m] for m in missing}))
    raise MissingDependencyError(f"{command} needs {' and '.join(names)}: pip install 'baichuan-tune[{extras}]'")
