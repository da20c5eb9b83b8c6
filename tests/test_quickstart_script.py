"""recipes/quickstart.sh run as a user runs it, in bash, with every stage shrunk by --set to a few steps.

The script's subcommands and run names must fit together: each stage reads what the previous
one wrote, and `wartok compare` at the end finds both chains' reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
RUNS = ("tokenizer", "prior", "wartok", "prior-wartok", "baseline", "prior-baseline")


def tiny_overrides(output_dir: Path) -> list[str]:
    """Return --set arguments that turn the quickstart recipe into the tiny test recipe."""
    recipe = tiny_recipe(output_dir)
    recipe["sample"] = {"num_samples": 10, "batch_size": 10, "preview": 0}
    # gfid reads the samples through the script's evaluate.samples=samples/<name>.
    recipe["evaluate"] = {"metrics": ["reconstruction", "gfid", "gloss"], "batch_size": 16}
    arguments = []
    for key, value in recipe.items():
        fields = value.items() if isinstance(value, dict) else [(None, value)]
        for field, setting in fields:
            name = key if field is None else f"{key}.{field}"
            arguments += ["--set", f"{name}={json.dumps(setting)}"]  # JSON values are valid YAML
    return arguments


@pytest.fixture(scope="module")
def script_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart-script")
    output_dir = root / "runs"
    # The wartok entry point sits beside the interpreter in the environment that runs the tests.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               WARTOK_CACHE_DIR=str(root / "cache"))  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "recipes" / "quickstart.sh"), *tiny_overrides(output_dir)],
                            check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    return result, output_dir


def test_script_completes(script_run):
    result, _ = script_run
    assert result.returncode == 0, result.stderr[-4000:]


def test_script_trains_both_chains(script_run):
    _, output_dir = script_run
    for run in RUNS:
        assert (output_dir / run / "metrics.json").is_file(), run


def test_script_compares_the_chains(script_run):
    result, output_dir = script_run
    comparison = json.loads((output_dir / "comparison.json").read_text())
    assert comparison["baseline"]["weight"] == 0.0
    assert Path(comparison["wartok"]["report"]).parent.name == "evaluate-wartok"
    assert "baseline and wAR-Tok after" in result.stdout
    assert "gfid" in comparison["wartok"]["metrics"]
