"""Generated files: the recipe reference in docs/ and the shell completion scripts.

Both are derived from code (the recipe models and the Typer app), committed, and
checked by a test that fails when they are out of date. Regenerate them with

    python -m wartok_cli.reference
"""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from wartok_cli.recipe import Recipe

SHELLS = ("bash", "zsh", "fish")
PROG_NAME = "wartok"
COMPLETE_VAR = "_WARTOK_COMPLETE"


def completion_script(shell: str) -> str:
    """Return the completion script of one shell; the script calls the installed wartok for candidates."""
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG_NAME, complete_var=COMPLETE_VAR, shell=shell).strip() + "\n"


def _type_name(annotation) -> str:
    text = str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    for noise in ("typing.", "pathlib.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None").replace("|", "or")


def _bounds(field: FieldInfo) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >="}
    parts = []
    for item in field.metadata:
        for name, symbol in symbols.items():
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(section)"
    value = field.default
    if isinstance(value, Path):
        value = str(value)
    return "null" if value is None else f"`{value!r}`".replace("'", '"') if isinstance(value, str) else f"`{value}`"


def _section_rows(fields: dict[str, FieldInfo]) -> list[str]:
    rows = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {_bounds(field)} | {description} |")
    return rows


def recipe_reference() -> str:
    """Return the Markdown reference of every recipe field, section by section."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from `wartok_cli/recipe.py` by `python -m wartok_cli.reference`; do not edit by hand.",
        "Every field can be overridden on the command line with `--set section.field=value`.",
        "",
        "## Top level",
        "",
    ]
    sections = {
        name: field.annotation
        for name, field in Recipe.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    lines += _section_rows({name: field for name, field in Recipe.model_fields.items() if name not in sections})
    for name, model in sections.items():
        lines += ["", f"## `{name}`", "", (model.__doc__ or "").strip(), ""]
        lines += _section_rows(model.model_fields)
    return "\n".join(lines) + "\n"


def generated_files(root: Path) -> dict[Path, str]:
    """Return every generated file under the repository root with its expected content."""
    files = {root / "docs" / "recipe-reference.md": recipe_reference()}
    for shell in SHELLS:
        files[root / "completions" / f"wartok.{shell}"] = completion_script(shell)
    return files


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    for path, content in generated_files(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path.relative_to(root)}")


if __name__ == "__main__":
    main()
