"""The typed config system: defaults, YAML, CLI overrides, validation and suggestions."""

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from baichuan_tune.config import ConfigError, config_help, opt, parse_config, save_config


@dataclass
class Example:
    learning_rate: float = opt(3e-4, "peak learning rate")
    epochs: int = opt(3, "passes over the data")
    bf16: bool = opt(False, "bf16 autocast")
    template: Literal["baichuan2", "base"] = opt("baichuan2", "prompt template")
    targets: list[str] = opt(factory=lambda: ["all"], help="LoRA modules")
    limit: int | None = opt(None, "optional limit")


def test_defaults_then_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nepochs: 5\ntargets: [W_pack, o_proj]\n")
    cfg = parse_config(Example, [str(path), "--epochs", "7", "--bf16", "--template=base"])
    assert cfg.learning_rate == 1e-4 and cfg.epochs == 7 and cfg.bf16 is True
    assert cfg.template == "base" and cfg.targets == ["W_pack", "o_proj"] and cfg.limit is None


def test_cli_strings_are_typed():
    cfg = parse_config(Example, ["--learning_rate", "5e-5", "--targets", "W_pack,o_proj", "--limit", "10", "--bf16", "false"])
    assert cfg.learning_rate == 5e-5 and cfg.targets == ["W_pack", "o_proj"] and cfg.limit == 10 and cfg.bf16 is False


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown option 'learning_rte'.*did you mean 'learning_rate'"):
        parse_config(Example, ["--learning_rte", "1"])
    path = tmp_path / "c.yaml"
    path.write_text("epoch: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown option 'epoch'.*'epochs'"):
        parse_config(Example, [str(path)])


@pytest.mark.parametrize("flag,value,message", [
    ("--epochs", "2.5", "must be an integer"),
    ("--epochs", "many", "must be an integer"),
    ("--learning_rate", "fast", "must be a number"),
    ("--bf16", "maybe", "true or false"),
    ("--template", "llama", r"must be one of \['baichuan2', 'base'\]"),
])
def test_bad_values_name_the_key(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Example, [flag, value])


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        parse_config(Example, [str(path)])
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        parse_config(Example, [str(tmp_path / "missing.yaml")])


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(Example, ["--epochs", "4"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["epochs"] == 4
    assert parse_config(Example, [str(tmp_path / "config.yaml")]) == cfg


def test_help_lists_every_option_with_its_help():
    text = config_help(Example, "prog")
    for name in ("learning_rate", "epochs", "bf16", "template", "targets", "limit"):
        assert f"--{name}" in text
    assert "peak learning rate" in text


@dataclass
class Edges:
    bits: Literal[4, 8] = opt(4, "quantisation bits")
    seed: int = opt(42, "seed")
    name: str = opt("run", "a name")
    dataset: list[str] = opt(factory=list, help="files")
    packing: bool = opt(False, "pack")


def test_integer_literals_and_exact_integers_from_the_command_line():
    cfg = parse_config(Edges, ["--bits", "8", "--seed", "12345678901234567891"])
    assert cfg.bits == 8 and isinstance(cfg.bits, int)
    assert cfg.seed == 12345678901234567891  # float() would have rounded it to ...7168
    with pytest.raises(ConfigError, match=r"'bits' must be one of \[4, 8\], got '5'"):
        parse_config(Edges, ["--bits", "5"])


def test_yaml_null_is_not_the_string_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name:\n")
    with pytest.raises(ConfigError, match="c.yaml: 'name' must be a string, got None"):
        parse_config(Edges, [str(path)])


def test_bare_flags_switch_booleans_on_and_other_options_need_a_value():
    assert parse_config(Edges, ["--packing", "--seed", "1"]).packing is True
    with pytest.raises(ConfigError, match="'--dataset' needs a value"):
        parse_config(Edges, ["--dataset", "--packing"])
    with pytest.raises(ConfigError, match="'--seed' needs a value"):
        parse_config(Edges, ["--seed"])


def test_repeated_flags_collect_lists_and_keep_the_last_scalar():
    cfg = parse_config(Edges, ["--dataset", "a.json", "--dataset", "b.json, c.json,", "--seed", "1", "--seed", "2"])
    assert cfg.dataset == ["a.json", "b.json", "c.json"] and cfg.seed == 2


def test_a_flow_list_keeps_commas_inside_items():
    cfg = parse_config(Edges, ["--dataset", '["Hello, world", 你好]'])
    assert cfg.dataset == ["Hello, world", "你好"]


def test_an_older_option_name_is_read_as_the_new_one_with_a_warning(tmp_path, capsys):
    from baichuan_tune.options import LoadOptions

    cfg = parse_config(LoadOptions, ["--quantize", "4"])
    assert cfg.quantization_bit == 4
    assert "'quantize' is deprecated; use 'quantization_bit'" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("quantize: 8\n")
    assert parse_config(LoadOptions, [str(path)]).quantization_bit == 8
    assert f"{path}: option 'quantize' is deprecated" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown option 'out'"):  # no output_dir here: not an alias
        parse_config(LoadOptions, ["--out", "x"])


def test_every_command_uses_one_name_per_concept():
    import dataclasses
    import importlib

    from baichuan_tune.cli import COMMANDS
    from baichuan_tune.config import DEPRECATED_NAMES

    seen = 0
    for module in set(COMMANDS.values()):
        mod = importlib.import_module(f"baichuan_tune.commands.{module}")
        for cls in [v for v in vars(mod).values() if dataclasses.is_dataclass(v) and isinstance(v, type)]:
            names = {f.name for f in dataclasses.fields(cls)}
            seen += 1
            assert not names & set(DEPRECATED_NAMES), f"{module}.{cls.__name__} still has {names & set(DEPRECATED_NAMES)}"
    assert seen >= len(set(COMMANDS.values())) - 2  # nearly every command declares its options here
