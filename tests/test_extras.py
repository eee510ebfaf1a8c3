"""Optional dependencies are checked when a command starts, before any model loads or file is written.

A module "not installed" is simulated the way Python itself reports one: `sys.modules[name] = None` makes
`import name` raise ModuleNotFoundError. The loaders are replaced by a tripwire, so a check that came after
loading (the loss plot at the end of a run, as before) fails the test instead of passing it.
"""

from __future__ import annotations

import sys

import pytest

from baichuan_tune import cli
from baichuan_tune.models import checkpoint

TRAIN = "pip install 'baichuan-tune[train]'"
QUANT = "pip install 'baichuan-tune[quant]'"


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "hi", "output": "hello"}]')
    return str(path)


@pytest.fixture
def no_loading(monkeypatch):
    def tripwire(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the dependency check")

    for name in ("load_model_and_tokenizer", "load_model", "validate_checkpoint"):
        monkeypatch.setattr(checkpoint, name, tripwire)


def missing(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def error_of(capsys, argv) -> str:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo"])
def test_training_without_matplotlib_fails_at_once(tmp_path, monkeypatch, capsys, no_loading, data, command):
    missing(monkeypatch, "matplotlib")
    out = tmp_path / "run"
    err = error_of(capsys, [command, "--dataset", data, "--output_dir", str(out), "--report_to", "none"])
    assert err == (f"error: {command} needs matplotlib (for the loss plots; --plot_loss false goes without): {TRAIN}")
    assert not out.exists()  # nothing written either


def test_a_plain_install_names_both_training_extras(tmp_path, monkeypatch, capsys, no_loading, data):
    missing(monkeypatch, "matplotlib", "tensorboard")
    err = error_of(capsys, ["sft", "--dataset", data, "--output_dir", str(tmp_path / "run")])
    assert err == ("error: sft needs matplotlib (for the loss plots; --plot_loss false goes without) and tensorboard "
                   f"(for the TensorBoard logs; --report_to none goes without): {TRAIN}")


def test_the_built_in_demo_is_checked_too(monkeypatch, capsys, no_loading):
    missing(monkeypatch, "tensorboard")
    err = error_of(capsys, ["sft"])
    assert "sft needs tensorboard" in err and TRAIN in err


@pytest.mark.parametrize("flags,why", [
    (["--finetuning_type", "qlora"], "for --finetuning_type qlora"),
    (["--optim", "paged_adamw_8bit"], "for --optim paged_adamw_8bit"),
])
def test_bitsandbytes_for_qlora_and_eight_bit_optimizers(tmp_path, monkeypatch, capsys, no_loading, data, flags, why):
    missing(monkeypatch, "bitsandbytes")
    err = error_of(capsys, ["sft", "--dataset", data, "--output_dir", str(tmp_path / "r"), *flags])
    assert err == f"error: sft needs bitsandbytes ({why}): {QUANT}"


def test_several_extras_in_one_install_command(tmp_path, monkeypatch, capsys, no_loading, data):
    missing(monkeypatch, "bitsandbytes", "matplotlib")
    err = error_of(capsys, ["dpo", "--dataset", data, "--output_dir", str(tmp_path / "r"), "--report_to", "none",
                            "--finetuning_type", "qlora"])
    assert err.endswith(": pip install 'baichuan-tune[quant,train]'") and "bitsandbytes" in err and "matplotlib" in err


@pytest.mark.parametrize("argv", [
    ["chat", "--model", "default", "--quantization_bit", "4"],
    ["serve", "--model", "default", "--quantization_bit", "8"],
    ["eval", "--model", "default", "--quantization_bit", "4", "--task", "ppl", "--data", "missing.txt"],
], ids=["chat", "serve", "eval"])
def test_quantised_loading_needs_bitsandbytes(monkeypatch, capsys, no_loading, argv):
    missing(monkeypatch, "bitsandbytes")
    assert error_of(capsys, argv) == f"error: {argv[0]} needs bitsandbytes (for --quantization_bit {argv[4]}): {QUANT}"


def test_serve_needs_fastapi_and_uvicorn(monkeypatch, capsys, no_loading):
    missing(monkeypatch, "fastapi", "uvicorn")
    assert error_of(capsys, ["serve", "--model", "default"]) == \
        "error: serve needs fastapi and uvicorn: pip install 'baichuan-tune[serve]'"


def test_options_that_need_no_extra_are_not_refused(tmp_path, monkeypatch, no_loading):
    """--plot_loss false --report_to none: no training extra needed, so the run goes on to load the model."""
    missing(monkeypatch, "matplotlib", "tensorboard", "bitsandbytes", "fastapi", "uvicorn")
    with pytest.raises(ModelLoaded):
        cli.main(["sft", "--dataset", "demo", "--output_dir", str(tmp_path / "r"), "--plot_loss", "false",
                  "--report_to", "none", "--device", "cpu"])
    with pytest.raises(ModelLoaded):
        cli.main(["chat", "--model", "default"])
    with pytest.raises(ModelLoaded):
        cli.main(["export", "--model", "default", "--adapter", str(tmp_path), "--output_dir", str(tmp_path / "m")])
