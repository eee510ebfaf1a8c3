"""Run a `baichuan-tune` command as a user does: in a fresh process, or as N gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_cli(command: str, args: list[str], processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m baichuan_tune.cli COMMAND ARGS` (processes > 1: under torch.distributed.run); asserts success."""
    if processes > 1 and not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built in")
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "baichuan_tune.cli", command, *args], capture_output=True,
                          text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "trainer_log.jsonl").read_text().splitlines()]
