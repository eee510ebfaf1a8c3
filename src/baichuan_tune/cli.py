"""`baichuan-tune` entry point: dispatches to one module per sub-command.

Each sub-command lives in `baichuan_tune/commands/<name>.py` with a `main(argv)` function; the first
line of its docstring is its description here, read from the source file without importing it. Modules
are imported only when their command runs, so `--help` is fast (no torch, no transformers) and a
command's optional dependencies are needed only by that command.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

# name -> module under baichuan_tune.commands (in the order `--help` lists them)
COMMANDS = {
    "demo": "demo",
    "sft": "sft",
    "rm": "rm",
    "ppo": "ppo",
    "dpo": "dpo",
    "kto": "kto",
    "grpo": "grpo",
    "chat": "chat",
    "serve": "serve",
    "webui": "webui",
    "export": "export",
    "eval": "eval",
    "convert": "convert",
    "tokenizer": "tokenizer",
}


def _describe(module_name: str) -> str | None:
    """The first line of the command module's docstring, or None when there is no such module."""
    spec = importlib.util.find_spec(f"baichuan_tune.commands.{module_name}")
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None  # not built yet
    with open(spec.origin, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read(), spec.origin)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


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
