"""User-facing errors: one clear message naming the file, record and field, never a deep traceback."""

from __future__ import annotations

import os
import sys


class BaichuanTuneError(Exception):
    """Base of every error the project raises for bad input (files, data records, options)."""


class CheckpointError(BaichuanTuneError):
    """A model folder or one of its files is missing, corrupt or does not match its config."""


class DataError(BaichuanTuneError):
    """A data file or record is malformed; the message names the file, record number and field."""


class WriteError(BaichuanTuneError):
    """A file could not be written (a full disk above all); the message names it and what is still safe."""


class MissingDependencyError(BaichuanTuneError):
    """An optional dependency the command needs is not installed; the message gives the pip command."""


def run_with_clear_errors(func, argv) -> int:
    """Run a command; turn the project's own errors into one line on stderr and exit code 2.

    Set BAICHUAN_TUNE_DEBUG=1 to see the full traceback instead.
    """
    try:
        result = func(argv)
    except BaichuanTuneError as exc:
        if os.environ.get("BAICHUAN_TUNE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def warn(message: str) -> None:
    """One line on stderr for something the user should know that does not stop the command."""
    print(f"warning: {message}", file=sys.stderr)
