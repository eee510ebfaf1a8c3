"""Typed configs: dataclasses with defaults, overridden by a YAML file and then by `--key value` flags.

A command declares its options as a dataclass whose fields use `opt(default, "one-line help")`.
`parse_config(Cls, argv)` reads `[CONFIG.yaml] [--key value | --key=value ...]`, validates every key
and value before any heavy work, and returns the instance. An unknown key is an error that names the
closest valid one. On the command line a list is `a,b,c` or a YAML flow list (`'["a, b", c]'`) and a
repeated list option adds to it; a repeated scalar option keeps its last value; a bare `--flag` sets a
boolean. `save_config` writes the resolved config next to a command's outputs.

One name per concept across commands: an older name (`DEPRECATED_NAMES`) is still read, with a warning
naming the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import BaichuanTuneError


class ConfigError(BaichuanTuneError, ValueError):
    """A config file or flag is wrong; the message says which key and why."""


# Older option names, still accepted (with a warning) where the command has the new one.
DEPRECATED_NAMES = {
    "quantize": "quantization_bit",
    "out": "output_dir",
    "output": "output_dir",
    "overwrite": "overwrite_output_dir",
}


def _current_name(norm: str, valid, source: str) -> str:
    """`norm`, or the name that replaced it (with a warning) when `norm` is an older name of a valid option."""
    new = DEPRECATED_NAMES.get(norm)
    if norm in valid or new not in valid:
        return norm
    from .errors import warn

    warn(f"{source}: option '{norm}' is deprecated; use '{new}'")
    return new


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None):  # noqa: A002 - mirrors argparse
    """A config field with its one-line help text."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, typ: Any, key: str, source: str) -> Any:
    """Turn `value` (from YAML or a command-line string) into `typ`, or raise ConfigError."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' cannot be {value!r}")
    if origin is typing.Literal:
        # A command line gives strings, so `Literal[4, 8]` must also accept "8".
        for choice in args:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        return _coerce_list(value, args[0] if args else str, key, source)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if typ in (int, float):
        kind = "an integer" if typ is int else "a number"
        if typ is int and isinstance(value, (int, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                return int(value)  # exact, where float() would round integers above 2**53
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}") from None
        if typ is float:
            return number
        if not number.is_integer():
            raise ConfigError(f"{source}: '{key}' must be {kind}, got {value!r}")
        return int(number)
    if typ is str:
        # YAML `key:` or `key: null` is None, which must not become the text "None".
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    if typ is Any:
        return value
    raise ConfigError(f"{source}: '{key}' has an unsupported type {typ}")  # pragma: no cover - programming error


def _coerce_list(value: Any, inner: Any, key: str, source: str) -> list:
    """A list from YAML, from `a,b,c`, or from a YAML flow list `["a, with comma", b]` on the command line."""
    items = value
    if isinstance(value, str):
        items = _flow_list(value) if value.lstrip().startswith("[") else value.split(",")
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
    items = [v.strip() if isinstance(v, str) else v for v in items]
    return [_coerce(v, inner, key, source) for v in items if v != ""]


def _flow_list(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text.split(",")


def apply_overrides(cfg, values: dict[str, Any], source: str):
    """Return a copy of dataclass `cfg` with `values` applied, each validated against its field type."""
    types_ = _field_types(type(cfg))
    changes = {}
    for key, value in values.items():
        norm = _current_name(key.replace("-", "_"), types_, source)
        if norm not in types_:
            raise ConfigError(f"{source}: unknown option '{key}'{_closest(norm, list(types_))}")
        changes[norm] = _coerce(value, types_[norm], norm, source)
    return dataclasses.replace(cfg, **changes)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def split_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """`[CONFIG.yaml] --key value --flag --key=value` -> (yaml path or None, [(key, value), ...]).

    A flag with no value (the next argument is another flag, or there is none) gets value None.
    """
    config_path, flags, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                value = None
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
            flags.append((key, value))
        elif config_path is None:
            config_path = arg
        else:
            raise ConfigError(f"unexpected argument '{arg}' (options are written --key value)")
        i += 1
    return config_path, flags


def merge_flags(cls, flags: list[tuple[str, str | None]]) -> dict[str, Any]:
    """Command-line pairs -> {key: value}: a bare flag switches a boolean on (any other option needs a
    value); a repeated list option collects every value (`--dataset a --dataset b`), any other repeated
    option keeps the last one, so a command can put its own defaults before the user's flags.
    """
    types_, merged = _field_types(cls), {}
    for key, value in flags:
        key = _current_name(key.replace("-", "_"), types_, "command line")
        typ = types_.get(key)
        if value is None:
            if typ is not bool and typ is not None:
                raise ConfigError(f"command line: '--{key}' needs a value")
            value = "true"
        if typing.get_origin(typ) in (list, tuple) and key in merged:
            merged[key] = _coerce(merged[key], typ, key, "command line") + _coerce(value, typ, key, "command line")
        else:
            merged[key] = value
    return merged


def parse_config(cls, argv: list[str], prog: str = "baichuan-tune"):
    """Build `cls` from defaults, then an optional YAML file, then `--key value` flags."""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cls, prog))
        raise SystemExit(0)
    cfg = read_options(cls, argv)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def read_options(cls, argv: list[str]):
    """`cls` from defaults, an optional YAML file and flags, every key and value checked; not yet `validate`d
    (which checks the options together), so a command can read the user's own options before adding its own."""
    config_path, flags = split_argv(argv)
    cfg = cls()
    if config_path is not None:
        cfg = apply_overrides(cfg, read_yaml(config_path), config_path)
    return apply_overrides(cfg, merge_flags(cls, flags), "command line")


def config_help(cls, prog: str) -> str:
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    lines = [f"usage: {prog} [CONFIG.yaml] [--key value ...]", ""]
    if doc:
        lines += [doc[0], ""]
    lines.append("options (defaults in brackets):")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name:<28} {f.metadata.get('help', '')} [{default}]")
    return "\n".join(lines)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a temp file renamed into place)."""
    from .io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
