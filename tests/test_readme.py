"""The README's promises, kept by running them.

- Its two set-up commands come first, and CI runs the second verbatim.
- **Every command in its ```bash blocks is run by a test**: the README is parsed, so a new
  command is picked up and fails :func:`test_every_readme_command_is_run_by_a_test` until a
  rule below runs it. Commands this file runs are run in README order in one temp folder
  (``sweeps/``, ``examples/``, ``launch.py`` and ``.venv`` linked in, a copy of the README),
  exactly as written there, with budget overrides appended to every command of a sweep file
  (``--resume`` refuses overrides other than the run's, so readers get them too): one tiny
  quickstart is the finished sweep that ``--report``, ``--export``, ``--compare``,
  ``--resume``, ``--ui`` and ``--dry-run`` use. Cluster commands are run by the tests named
  in :data:`ELSEWHERE`.
- The quickstart's output is quiet: under 80 lines, no line repeating the one before except
  for a clock.
- Its result tables are generated (:mod:`debias.tables`): each block equals its file.
- It is self-contained: no path outside the repository, the venv's interpreter in every
  command, links and cited sections that exist.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

README = REPO / "README.md"

#: Appended to a README command that trains, by the sweep file it runs (later --set wins):
#: 8-px images, a few hundred of them, one epoch, two search trials and two seeds.
BUDGET: dict[str, list[str]] = {
    "sweeps/quickstart.yaml": [
        "dataset.size=400", "dataset.image_size=8", "search.num_samples=2",
        "search.space.train.epochs={choice: [1]}", "seeds=[0, 1]", "jtt.epochs_id=1"],
    "sweeps/compare_synthetic.yaml": [
        "dataset.size=400", "dataset.image_size=8", "search.num_samples=1",
        "search.space.train.epochs={choice: [1]}", "seeds=[0]", "reference.epochs=1",
        "slim.curated_size=100", "slim.budget_per_class=4"],
    "examples/custom_method.yaml": [
        "dataset.size=400", "dataset.image_size=8", "search.num_samples=1", "seeds=[0]",
        "train.epochs=1"],
}
#: `--write-dataset`: images written (the README writes 1000).
WRITE_IMAGES = 40
#: Commands run by other tests (a real `ray up`, a Ray Job, sweep files on a running Ray):
#: {pattern: (test file, a string that test must contain)}.
ELSEWHERE: dict[str, tuple[str, str]] = {
    r"^ray (up|down) ": ("tests/test_ray_up.py", "def test_ray_up_runs_a_sweep_and_ray_down"),
    r"^ray dashboard ": ("tests/test_jobs.py", "dashboard"),
    r"--submit|--status": ("tests/test_jobs.py", '"--submit"'),
    # A sweep driven on a running cluster: test_ray_up's `ray up` cluster (the shipped
    # CelebA / Waterbirds files themselves run end to end in test_rehearsal.py).
    r"--address auto": ("tests/test_ray_up.py", '"--address"'),
}
#: The set-up parts CI runs on a clean clone (.ci/run).
CI_PARTS = (r"^python3 -m venv \.venv$", r"^\.venv/bin/pip install -e (\.|'\.\[test\]')$",
            r"^\.ci/system-deps\.sh$", r"^\.venv/bin/python -m pytest$")


@dataclass
class Command:
    """One shell command of a README block, with the variables set before it there."""

    text: str
    block: int
    prelude: list[str] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of the README's bash blocks: continuations joined, comments dropped,
    ``&&`` chains split; ``VAR=...`` lines become the prelude of what follows them."""
    out = []
    for i, block in enumerate(_blocks(text if text is not None else README.read_text())):
        prelude: list[str] = []
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            if len(words) == 1 and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value
                prelude.append(line)
                continue
            out += [Command(part.strip(), i, list(prelude)) for part in line.split(" && ")]
    return out


def _runner(cmd: Command) -> str:
    """ci | elsewhere | ui | here; "" when no test runs it."""
    if any(re.match(p, cmd.text) for p in CI_PARTS):
        return "ci"
    if any(re.search(p, cmd.text) for p in ELSEWHERE):
        return "elsewhere"
    words = [w for w in cmd.words if not re.match(r"^[A-Z_]+=", w)]
    if words[:2] == [".venv/bin/python", "launch.py"]:
        return "ui" if "--ui" in words else "here"
    if words[:3] == [".venv/bin/python", "-m", "debias.tables"]:
        return "here"
    return ""


# ------------------------------------------------------------------ fast: the text itself


def test_readme_opens_with_the_two_setup_commands() -> None:
    first, second = _blocks(README.read_text())[:2]
    assert "launch.py sweeps/quickstart.yaml" in first and "pip install -e ." in first
    assert second.endswith("-m pytest") and "'.[test]'" in second
    assert second.startswith(".ci/system-deps.sh && ")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    second = _blocks(README.read_text())[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert second in ci, ".ci/run must run the README's test command unchanged"


def test_every_readme_command_is_run_by_a_test() -> None:
    commands = readme_commands()
    assert len(commands) > 10
    orphans = [c.text for c in commands if not _runner(c)]
    assert not orphans, f"README commands no test runs (add a rule in {__file__}): {orphans}"
    for pattern, (path, needle) in ELSEWHERE.items():
        if any(re.search(pattern, c.text) for c in commands):
            assert needle in (REPO / path).read_text(), f"{path} no longer runs {pattern}"
    for cmd in commands:
        for word in cmd.words:
            if word.endswith((".yaml", ".py")) and not word.startswith("-") and "=" not in word:
                assert (REPO / word).is_file(), f"{cmd.text}: {word} is not in the repository"
    # The parser sees what a reader sees: a changed command is a changed test.
    sample = readme_commands("```bash\nX='a b'\n.venv/bin/python launch.py s.yaml \\\n"
                             "    --set \"$X\"   # note\nA && B\n```\n")
    assert [(c.text, c.prelude) for c in sample] == [
        ('.venv/bin/python launch.py s.yaml --set "$X"', ["X='a b'"]),
        ("A", ["X='a b'"]), ("B", ["X='a b'"])]


def test_readme_is_self_contained() -> None:
    text = README.read_text()
    # No path outside the repository (../shared/..., absolute links).
    assert not re.search(r"\]\((\.\./|/)", text) and "../" not in text
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"https?://", target):
            assert (REPO / target).exists(), f"README links {target}, which does not exist"
    # The venv's interpreter in every command (a plain `python` has none of the packages).
    for cmd in readme_commands():
        words = [w for w in cmd.words if not re.match(r"^[A-Z_]+=", w)]
        assert words[0] != "python", f"`{cmd.text}`: use .venv/bin/python"
    # Sections it cites exist: `FILE.md`, "Section" and [..](#anchor).
    for file, section in re.findall(r"`([A-Z]+\.md)`, \"([^\"]+)\"", text):
        section = " ".join(section.split())  # the README wraps lines inside quotes
        headings = re.findall(r"^#+ (.+)$", (REPO / file).read_text(), flags=re.M)
        assert any(h.strip().startswith(section) for h in headings), \
            f"README cites {file}, \"{section}\": no such section"
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, f"README links #{anchor}: no such section"


def test_readme_result_blocks_are_their_generated_files() -> None:
    from debias.tables import readme_blocks

    blocks = readme_blocks(README.read_text())
    assert blocks, "the README shows no generated result table"
    for file, copy in blocks.items():
        path = REPO / file
        assert path.is_file(), f"README block {file}: no such file"
        assert copy == path.read_text(), (
            f"README's copy of {file} differs from the file: regenerate it with the command "
            "in its first line, never edit it by hand")
        assert "generated from the MLflow record of" in copy.splitlines()[0]


def test_the_code_is_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO / "debias"),
                             str(REPO / "tests"), str(REPO / "launch.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ slow: running them


def _workdir(tmp_path: Path) -> Path:
    """A folder where the README's relative paths mean what they mean in a checkout."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("launch.py", ".venv"):
        (work / name).symlink_to(REPO / name)
    # Copies: a command may write into them (`--schema > sweeps/sweep.schema.json`, the table
    # generator's README block), never into the repository.
    for name in ("sweeps", "examples"):
        shutil.copytree(REPO / name, work / name)
    shutil.copy(README, work / "README.md")
    return work


def _budget(cmd: Command) -> list[str]:
    words = cmd.words
    if "--write-dataset" in words:
        return ["--images", str(WRITE_IMAGES)]
    sweep = next((w for w in words[2:] if w.endswith(".yaml")), None)
    if sweep is None or any(flag in words for flag in ("--compare", "--schema")):
        return []
    budget = BUDGET.get(sweep)
    if budget is None and "--dry-run" in words:  # validates, trains nothing
        return []
    assert budget is not None, f"`{cmd.text}` trains on {sweep}: give it a BUDGET entry"
    return [a for item in budget for a in ("--set", item)]


def _bash(cmd: Command, work: Path, timeout: float = 300,
          ray_address: str | None = None) -> subprocess.CompletedProcess[str]:
    budget = shlex.join(_budget(cmd))
    lines = [*cmd.prelude]
    text = cmd.text
    if budget and ">" in text:
        text = text.replace(" >", f" {budget} >", 1)
    elif budget:
        text = f"{text} {budget}"
    lines.append(text)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(["bash", "-c", "\n".join(lines)], cwd=work, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _without_clock(line: str) -> str:
    return re.sub(r"\d+h\d+m|\d+m\d+s|\d+(\.\d+)?s\b", "T", line)


def check_quiet(output: str, lines: int = 80) -> None:
    """Fits on two screens; no line repeats the one before except for a clock."""
    shown = output.splitlines()
    assert len(shown) < lines, f"{len(shown)} lines:\n{output}"
    repeats = [b for a, b in itertools.pairwise(shown)
               if a.strip() and _without_clock(a) == _without_clock(b)]
    assert not repeats, f"lines repeating the one before: {repeats}\n{output}"


def _run_ui(cmd: Command, work: Path) -> str:
    """Start the `--ui` command, read the URL it prints, stop it with Ctrl-C."""
    log = work / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {cmd.text}"], cwd=work, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops it" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)
        text = log.read_text()
        assert "Ctrl-C stops it" in text, text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
        return text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path: Path, ray_local: Any) -> None:
    """The README's commands, in its order, in one checkout-like folder: the first is the
    quickstart, whose finished sweep every later reader command uses. The quickstart starts
    its own Ray, as a new user's does; later sweeps join the session's local Ray
    (``RAY_ADDRESS``: seconds saved per command), except one whose modules come from its own
    ``PYTHONPATH`` (a running cluster's workers would not see them)."""
    address = ray_local.get_runtime_context().gcs_address
    work = _workdir(tmp_path)
    ran: list[str] = []
    timings = []
    for cmd in readme_commands():
        runner = _runner(cmd)
        if runner not in ("here", "ui"):
            continue
        started = time.monotonic()
        if runner == "ui":
            text = _run_ui(cmd, work)
            assert "viewStateShareKey=debias-comparison" in text, text
        else:
            shared = address if ran and not re.match(r"^[A-Z_]+=", cmd.text) else None
            result = _bash(cmd, work, ray_address=shared)  # stdout and stderr, as shown
            text = result.stdout
            assert result.returncode == 0, f"`{cmd.text}` exited {result.returncode}:\n{text}"
            _check(cmd, result.stdout, work)
        timings.append(f"{time.monotonic() - started:5.1f}s  {cmd.text}")
        ran.append(cmd.text)
    print("\n".join(timings))
    assert ran and ran[0].endswith("launch.py sweeps/quickstart.yaml"), ran


def _check(cmd: Command, out: str, work: Path) -> None:
    """What each kind of command must have done, beyond exiting 0."""
    words = cmd.words
    if words[2:] == ["sweeps/quickstart.yaml"]:  # the first command a new user runs
        check_quiet(out)
        assert "Results of sweep 'quickstart'" in out and "erm" in out and "groupdro" in out
        assert re.search(r"sweep 'quickstart': (\d+)/\1 trials done \| finished in", out), out
    elif "--dry-run" in words:
        assert "dry run" in out
    elif "--write-dataset" in words:
        folder = work / words[words.index("--write-dataset") + 2]
        assert len([p for p in folder.rglob("*.jpg")]) >= WRITE_IMAGES, out
    elif "--report" in words or "--resume" in words:
        assert "Results of sweep" in out and "±" in out
    elif "--export" in words:
        folder = work / words[words.index("--export") + 1]
        assert any(folder.rglob("state_dict.pt")), out
    elif "--compare" in words:
        assert "Comparison of" in out and all(n in out for n in words[words.index(
            "--compare") + 1:])
    elif "--schema" in words:  # (test_spec.py checks that the shipped one is current)
        import json

        schema = json.loads((work / words[-1]).read_text())
        assert {"name", "dataset", "search"} <= set(schema["properties"])
    elif words[:3] == [".venv/bin/python", "-m", "debias.tables"]:
        from debias.tables import readme_blocks

        out_file = words[words.index("--out") + 1]
        text = (work / out_file).read_text()
        assert readme_blocks((work / "README.md").read_text())[out_file] == text
        assert "| erm |" in text
