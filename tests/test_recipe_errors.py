"""Recipe mistakes through the CLI: exit status 2, a message naming the file, field and value, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import describe, invoke, tiny_recipe

USER_ERROR = 2


def write_recipe(folder: Path, **sections) -> Path:
    """Write the tiny recipe with some sections replaced or extended; return its path."""
    recipe = tiny_recipe(folder / "runs")
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **value}
        else:
            recipe[name] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def assert_user_error(result) -> None:
    """Assert what every recipe error shares: exit status 2 and no traceback."""
    assert result.exit_code == USER_ERROR, describe(result)
    assert "Traceback" not in result.output


def test_unknown_key_suggests_field(tmp_path):
    path = write_recipe(tmp_path, pretrain={"stpes": 10})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert str(path) in result.output
    assert "pretrain.stpes: unknown key" in result.output
    assert "Did you mean 'steps'?" in result.output


def test_unknown_section_suggests_section(tmp_path):
    path = write_recipe(tmp_path, tokeniser={"codebook_size": 16})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "tokeniser: unknown key" in result.output
    assert "Did you mean 'tokenizer'?" in result.output


def test_unknown_key_lists_known_keys(tmp_path):
    path = write_recipe(tmp_path, prior={"zzzz": 1})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "prior.zzzz: unknown key" in result.output
    assert "Known keys here:" in result.output
    assert "width" in result.output


def test_wrong_type_names_value(tmp_path):
    path = write_recipe(tmp_path, pretrain={"steps": "ten"})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert str(path) in result.output
    assert "pretrain.steps = 'ten'" in result.output


def test_out_of_range_names_value(tmp_path):
    path = write_recipe(tmp_path, tokenizer={"codebook_size": 1})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "tokenizer.codebook_size = 1" in result.output
    assert "greater than or equal to 2" in result.output


def test_invalid_choice_names_value(tmp_path):
    path = write_recipe(tmp_path, data={"fit": "stretch"})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "data.fit = 'stretch'" in result.output


def test_heads_not_dividing_width(tmp_path):
    path = write_recipe(tmp_path, prior={"width": 32, "heads": 3})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "heads (3) must divide width (32)" in result.output


def test_resolution_not_divisible(tmp_path):
    path = write_recipe(tmp_path, data={"resolution": 18}, tokenizer={"channel_mult": [1, 2, 2]})
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "data.resolution (18)" in result.output


def test_invalid_recipe_writes_nothing(tmp_path):
    path = write_recipe(tmp_path, pretrain={"stpes": 10})
    invoke("prepare", str(path))
    assert not (tmp_path / "runs").exists()


def test_override_without_equals(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "pretrain.steps")
    assert_user_error(result)
    assert "Invalid override 'pretrain.steps'" in result.output


def test_override_into_a_value(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "pretrain.steps.max=3")
    assert_user_error(result)
    assert "steps is a value, not a section" in result.output


def test_override_out_of_range(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "pretrain.steps=-3")
    assert_user_error(result)
    assert "--set pretrain.steps=-3" in result.output
    assert "pretrain.steps = -3" in result.output


def test_override_unknown_key(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "wartok.temprature=0.5")
    assert_user_error(result)
    assert "wartok.temprature: unknown key" in result.output
    assert "Did you mean 'temperature'?" in result.output


def test_override_invalid_yaml_value(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "tokenizer.channel_mult=[1, 2")
    assert_user_error(result)
    assert "Invalid value in override" in result.output


def test_override_value_with_closing_tag(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "data.shards_dir=[/tmp/x]")
    assert_user_error(result)


def test_override_value_with_style_tag(tmp_path):
    path = write_recipe(tmp_path)
    result = invoke("prepare", str(path), "--set", "pretrain.steps=[bold]")
    assert_user_error(result)
    assert "--set pretrain.steps=[bold]" in result.output


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "absent.yaml"
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert f"Recipe not found: {path}" in result.output


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("pretrain:\n  steps: [1, 2\n  lr: 0.1\n")
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert f"{path}: invalid YAML" in result.output


def test_recipe_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- pretrain\n- wartok\n")
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert "a recipe must be a mapping of sections, got list" in result.output


@pytest.mark.parametrize("command", ["pretrain-tokenizer", "train-prior", "train-wartok"])
def test_every_stage_rejects_unknown_key(tmp_path, command):
    path = write_recipe(tmp_path, wartok={"wieght": 2.0})
    result = invoke(command, str(path))
    assert_user_error(result)
    assert "Did you mean 'weight'?" in result.output


def test_yaml_error_quoting_path_list(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  shards_dir: [/tmp/x\n  fit: pad\n")
    result = invoke("prepare", str(path))
    assert_user_error(result)
    assert f"{path}: invalid YAML" in result.output
