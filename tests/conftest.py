"""Shared fixtures: the published reference files in ../shared and tiny random-weight models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("BAICHUAN_TUNE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"


def need_shared(path: Path) -> Path:
    """Skip the calling test with a reason when a file from ../shared is absent (a user's fresh clone)."""
    if not path.exists():
        pytest.skip(f"needs the published reference material at {path} (present in CI, absent in a fresh clone)")
    return path


@pytest.fixture
def shared_reference() -> Path:
    return need_shared(REFERENCE)


@pytest.fixture
def shared_data() -> Path:
    return need_shared(DATA)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes the built-in default model into its own cache, never the user's."""
    home = tmp_path_factory.getbasetemp() / "baichuan_tune_home"
    monkeypatch.setenv("BAICHUAN_TUNE_HOME", str(home))


def tiny_model(preset: str = "tiny-baichuan2-7b", seed: int = 0, **overrides):
    """A tiny random-weight model of a published architecture, in fp32 eval mode."""
    import baichuan_tune  # noqa: F401  (registers the Auto classes)
    from baichuan_tune.models import BaichuanForCausalLM
    from baichuan_tune.models.presets import preset_config

    torch.manual_seed(seed)
    return BaichuanForCausalLM(preset_config(preset, **overrides)).eval()


def benchmark_script(name: str):
    """The module of benchmarks/<name>.py (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recording_batch_decoder(*args, **kwargs):
    """A serve `BatchDecoder` that keeps each decoding step's fp32 logits in `kept` ([rows, vocab]; inside a
    captured CUDA graph too): bench_batch_attention's RecordingDecoder."""
    return benchmark_script("bench_batch_attention").RecordingDecoder(*args, **kwargs)


def sdpa_cudnn_allowed(monkeypatch) -> list[bool]:
    """Whether cuDNN's attention was allowed at each SDPA call the model makes from now on."""
    import torch.nn.functional as F

    allowed, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return allowed
