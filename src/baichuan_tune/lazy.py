"""Helpers for the command modules, which import torch only when a command runs (so `--help` is fast)."""

from __future__ import annotations

import functools


def no_grad(fn):
    """`@torch.no_grad()` that imports torch when the function is called, not when the module is imported."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
