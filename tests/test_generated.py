"""Generated files (recipe reference, shell completions) match the code that generates them."""

from __future__ import annotations

from pathlib import Path

import pytest

from wartok_cli.reference import generated_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(generated_files(ROOT)), ids=lambda path: path.name)
def test_generated_file_up_to_date(path):
    expected = generated_files(ROOT)[path]
    assert path.is_file(), f"{path} is missing; run `python -m wartok_cli.reference`"
    assert path.read_text() == expected, f"{path} is out of date; run `python -m wartok_cli.reference`"


def test_reference_lists_every_section_field():
    from wartok_cli.recipe import Recipe

    text = (ROOT / "docs" / "recipe-reference.md").read_text()
    for name, field in Recipe.model_fields.items():
        section = field.annotation
        fields = section.model_fields if hasattr(section, "model_fields") else {name: field}
        for field_name in fields:
            assert f"| `{field_name}` |" in text, f"{name}.{field_name} is missing from the reference"


def test_recipe_schema_command_outputs_json():
    import json

    from typer.testing import CliRunner

    from wartok_cli.app import app

    result = CliRunner().invoke(app, ["recipe", "schema"])
    assert result.exit_code == 0
    assert "wartok" in json.loads(result.output)["properties"]
