"""The CI script runs exactly the README's test command."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_extracts_readme_command(tmp_path):
    # Run .ci/run on a copy whose README contains a harmless command, and check that it ran.
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    marker = tmp_path / "ran"
    (tmp_path / "README.md").write_text(f"# x\n\n<!-- test-command -->\n```\ntouch {marker}\n```\n\nmore text\n")
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert marker.exists()


def test_ci_readme_has_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```")[1].strip()
    assert "pytest" in block
