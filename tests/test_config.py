"""Typed configs: YAML + key=value overrides, unknown keys and wrong types rejected with the key and the file."""

from pathlib import Path
from typing import Literal

import pytest

from recfound.config import CommaList, Config, ConfigError, InputURL, cli, describe, load_config
from recfound.train.config import TrainConfig


class Inner(Config):
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    rate: float = 0.1
    """Learning rate; higher trains faster but less stably."""


class Outer(Config):
    name: str = "run"
    """Run name."""
    steps: int = 10
    """Optimizer steps."""
    inner: Inner = Inner()
    data: InputURL | None = None
    """Dataset directory."""


def test_yaml_and_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  mode: b\n")
    cfg = load_config(Outer, str(path), ["inner.rate=0.5", "name=007"])
    assert (cfg.steps, cfg.inner.mode, cfg.inner.rate, cfg.name) == (5, "b", 0.5, "007")


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  colour: red\n")
    with pytest.raises(ConfigError, match=rf"{path}: inner.colour: unknown key"):
        load_config(Outer, str(path))


class Lists(Config):
    names: CommaList[str] = []
    ids: CommaList[int] | None = None


@pytest.mark.parametrize("given", ["a,b,c", "[a, b,c]", "a, ,b,c,"])
def test_comma_list_keys_take_the_command_lines_forms(given: str) -> None:
    cfg = load_config(Lists, None, [f"names={given}", "ids=3,4"])
    assert cfg.names == ["a", "b", "c"] and cfg.ids == [3, 4]
    with pytest.raises(ConfigError, match=r"ids"):
        load_config(Lists, None, ["ids=3,x"])


def test_every_list_key_of_a_training_run_takes_a_comma_list() -> None:
    """The same forms for every list key: train's tasks and the loss's task and layer lists too."""
    cfg = load_config(TrainConfig, None, ["tasks=u2i,q2i", "loss.logq_tasks=u2i", "loss.exit_layers=1"])
    assert (cfg.tasks, cfg.loss.logq_tasks, cfg.loss.exit_layers) == (["u2i", "q2i"], ["u2i"], [1])


def test_wrong_type_from_command_line_names_source() -> None:
    with pytest.raises(ConfigError, match=r"command line: steps: .*integer"):
        load_config(Outer, None, ["steps=many"])


def test_missing_input_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: .*no such file"):
        load_config(Outer, None, [f"data={tmp_path / 'nope'}"])


def test_missing_config_file_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, "/nonexistent.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(Outer, None, ["steps"])


def test_help_lists_every_leaf_with_its_doc(capsys: pytest.CaptureFixture[str]) -> None:
    text = "\n".join(describe(Outer))
    for key in ("name", "steps", "inner.mode", "inner.rate", "data"):
        assert f"  {key} (" in text
    assert "higher trains faster" in text
    with pytest.raises(SystemExit) as done:
        cli(Outer, ["--help"], "usage: job")
    assert done.value.code == 0
    assert "inner.rate" in capsys.readouterr().out


def test_cli_exits_with_message_on_bad_config() -> None:
    with pytest.raises(SystemExit, match="inner.mode"):
        cli(Outer, ["inner.mode=c"], "usage")


def test_help_shows_a_default_configs_values(tmp_path: Path) -> None:
    path = tmp_path / "default.yaml"
    path.write_text("steps: 42\ninner:\n  mode: b\n")
    text = "\n".join(describe(Outer, values=load_config(Outer, str(path))))
    assert "steps (int; default: 42)" in text and "inner.mode (a|b; default: 'b')" in text
