"""The `baichuan-tune` entry point: help that answers without importing torch, the Auto-class registration
that `import baichuan_tune` still gives, and a mistyped option that is an error, never the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from baichuan_tune import cli

SRC = Path(__file__).resolve().parents[1] / "src"
# Every command's help; serve's too (its server code loads only when it serves).
HELP_CASES = [["--help"], *([name, "--help"] for name in cli.COMMANDS), ["rm", "score", "--help"]]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


# Runs `python -m baichuan_tune.cli ARGS` in this process, then reports which heavy modules it imported.
CLI_THEN_MODULES = """
import json, runpy, sys
sys.argv = ["baichuan-tune", *sys.argv[1:]]
try:
    runpy.run_module("baichuan_tune.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


@pytest.mark.parametrize("args", HELP_CASES, ids=" ".join)
def test_help_imports_neither_torch_nor_transformers(args):
    done = run_python(CLI_THEN_MODULES, *args)
    assert done.returncode == 0, done.stderr
    usage, report = done.stdout.rsplit("\n", 2)[0], json.loads(done.stdout.splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, (args, report)
    assert "usage: baichuan-tune" in usage


def test_command_list_is_every_module_docstring_first_line():
    import importlib

    text = cli.usage()
    for name, module in cli.COMMANDS.items():
        doc = importlib.import_module(f"baichuan_tune.commands.{module}").__doc__
        assert f"  {name:<10} {doc.strip().splitlines()[0]}" in text


# Whatever is imported first, transformers' Auto classes resolve model_type "baichuan" afterwards.
REGISTRATION = """
import sys
exec(sys.argv[1])
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING
config = CONFIG_MAPPING["baichuan"]
print(config.__name__, MODEL_FOR_CAUSAL_LM_MAPPING[config].__name__, TOKENIZER_MAPPING[config].__name__)
"""


@pytest.mark.parametrize("first", [
    "import baichuan_tune",  # transformers imported afterwards: registered right after its import
    "import transformers, baichuan_tune",  # transformers already loaded: registered at once
    "from baichuan_tune.models import BaichuanConfig",  # transformers first imported by the model module itself
    "from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer",  # ... or by the tokenizer module
])
def test_import_registers_the_auto_classes_in_any_order(first):
    done = run_python(REGISTRATION, first)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanTokenizer"]


def test_package_import_is_light_and_the_model_classes_load_on_demand():
    done = run_python("import sys, baichuan_tune; light = 'torch' not in sys.modules; "
                      "print(light, baichuan_tune.BaichuanForCausalLM.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "BaichuanForCausalLM"]


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo"])
def test_a_mistyped_option_is_an_error_not_the_demo(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demos write into ./outputs: nothing may be written
    assert cli.main([command, "--datset", "x"]) == 2
    captured = capsys.readouterr()
    assert "unknown option 'datset'; did you mean 'dataset'?" in captured.err
    assert "demo" not in captured.out
    assert cli.main([command, "--max_steps", "two"]) == 2  # a bad value too
    captured = capsys.readouterr()
    assert "'max_steps' must be an integer" in captured.err and "demo" not in captured.out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["rm", "dpo"])
def test_pair_commands_offer_no_sft_only_options(command, capsys):
    """Packing and train_on do not apply to preference pairs: not listed, and an unknown option if given."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    listed = capsys.readouterr().out
    assert "--dataset" in listed and "--cutoff_len" in listed
    assert "--packing" not in listed and "--train_on" not in listed
    for option in ("--packing", "--train_on"):
        assert cli.main([command, option, "true", "--dataset", "pairs.json"]) == 2
        assert f"unknown option '{option[2:]}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    listed = capsys.readouterr().out
    assert "--packing" in listed and "--train_on" in listed
