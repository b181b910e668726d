"""The README's promises: its two set-up commands come first, and CI runs the second verbatim."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_opens_with_the_two_setup_commands() -> None:
    first, second = _commands()[:2]
    assert "launch.py sweeps/quickstart.yaml" in first and "pip install -e ." in first
    assert second.endswith("-m pytest") and "'.[test]'" in second
    assert second.startswith(".ci/system-deps.sh && ")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    second = _commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert second in ci, ".ci/run must run the README's test command unchanged"


def test_the_code_is_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO / "debias"),
                             str(REPO / "tests"), str(REPO / "launch.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
