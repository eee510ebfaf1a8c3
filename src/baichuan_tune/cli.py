"""`baichuan-tune` entry point: dispatches to one module per sub-command.

Each sub-command lives in `baichuan_tune/commands/<name>.py` with a `main(argv)` function; the first
line of its docstring is its description here. Modules are imported only when their command runs, so
`--help` is fast and a command's optional dependencies are needed only by that command.
"""

from __future__ import annotations

import importlib
import sys

# name -> module under baichuan_tune.commands (in the order `--help` lists them)
COMMANDS = {
    "demo": "demo",
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "dpo": "dpo",
    "chat": "chat",
    "serve": "serve",
    "webui": "webui",
    "export": "export",
    "eval": "eval",
    "convert": "convert",
    "tokenizer": "tokenizer",
}


def _describe(module_name: str) -> str | None:
    try:
        module = importlib.import_module(f"baichuan_tune.commands.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"baichuan_tune.commands.{module_name}":
            return None  # not built yet
        return "(unavailable: missing dependency " + str(exc.name) + ")"
    return (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""


def usage() -> str:
    lines = ["usage: baichuan-tune <command> [options]   (baichuan-tune <command> --help for its options)", ""]
    lines.append("commands:")
    for name, module in COMMANDS.items():
        text = _describe(module)
        if text is not None:
            lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS or _describe(COMMANDS[name]) is None:
        import difflib

        known = [n for n in COMMANDS if _describe(COMMANDS[n]) is not None]
        hint = difflib.get_close_matches(name, known, n=1)
        print(f"baichuan-tune: unknown command '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else ""), file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(f"baichuan_tune.commands.{COMMANDS[name]}")
    from .errors import run_with_clear_errors

    return run_with_clear_errors(module.main, rest)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
