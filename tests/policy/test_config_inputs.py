"""Config inputs a clumsy user or an attacker hands us: every one is refused up front with an error that
names the key or file, what was expected and what came; nothing falls back to the defaults silently."""
import re

import pytest

from policy.config import ConfigError, load_config
from tests.helpers import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"),
    ("train.weight_decay=inf", "train.weight_decay"),
    ("train.lr=nan", "train.lr"),
    ("train.grad_clip=-inf", "train.grad_clip"),
    ("model.image.width_mult=nan", "model.image.width_mult"),
    ("train.ema_decay=nan", "train.ema_decay"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number, got (inf|-inf|nan)"):
        load_config(QUICKSTART, [override])


def test_non_finite_action_bounds_are_refused():
    with pytest.raises(ConfigError, match=r"data.action_low\[1\]: expected a finite number, got inf"):
        load_config(QUICKSTART, ["data.action_bounds=spec", "data.action_low=[0,inf]", "data.action_high=[1,2]"])


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_outside_numpys_range_is_refused(seed):
    with pytest.raises(ConfigError, match=rf"train.seed: expected an integer in \[0, 2\*\*32\), got {seed}"):
        load_config(QUICKSTART, [f"train.seed={seed}"])


@pytest.mark.parametrize("override", ["train=5", "model=[1]"])
def test_a_value_for_a_whole_section_names_the_override(override):
    section = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"override '{re.escape(override)}': expected a value for a key inside "
                                          rf"section '{section}'"):
        load_config(QUICKSTART, [override])


@pytest.mark.parametrize("text, error", [
    ("", r"expected a mapping of sections .*got an empty file"),
    ("# only a comment\n", r"expected a mapping .*got an empty file"),
    ("- 1\n- 2\n", r"expected a mapping of sections .*got a list: \[1, 2\]"),
    ("train: [1,\n", r"expected valid YAML, got a syntax error: .*\(line \d+, column \d+\)"),
    ("train: !!python/object:os.system {}\n", r"expected plain YAML data .*python/object"),
    ("train: &r [1, *r]\n", r"expected a tree of values, got a YAML alias that refers to its own anchor"),
    ("just a string\n", r"expected a mapping .*got a str"),
])
def test_bad_config_files_are_named_errors(tmp_path, text, error):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^config file '{path}': {error}"):
        load_config(path)


def test_nested_alias_config_is_refused_before_it_expands(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 9 levels: 9**9 (387 million) strings once expanded
        lines.append(f"l{i}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 600
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "YAML nodes once aliases are expanded" in str(err.value) and len(str(err.value)) < 400


def test_empty_config_path_on_the_command_line_is_refused(capsys):
    import run_policy

    assert run_policy.main(["train", "--config", "", "--out", "/nonexistent/run"]) == 2
    assert "--config: expected a YAML file path, got an empty string" in capsys.readouterr().err
