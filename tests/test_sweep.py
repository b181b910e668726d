"""A real sweep end to end: sweep file -> Ray Tune + Optuna -> trainable -> MLflow -> report."""

from __future__ import annotations

from pathlib import Path

import pytest

from debias.cli import main
from debias.spec import load_spec
from debias.sweep import SweepError, run_sweep
from tests.conftest import check_sweep_runs, tiny_sweep, write_sweep

pytestmark = pytest.mark.slow


def test_two_target_sweep_logs_the_design_runs_and_reports(
        ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    spec = load_spec(path)
    run_sweep(spec)
    check_sweep_runs(spec.tracking_uri, "tiny", {"Odd": "Background", "Loopy": "Background"},
                     n_search=2, seeds=[0, 1], epochs=2)

    assert main([str(path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "Odd" in out and "Loopy" in out and "±" in out
    csv_text = (tmp_path / "results" / "tiny" / "report.csv").read_text()
    assert csv_text.count("\n") == 3  # header + one row per target
    assert "train.lr=" in (tmp_path / "results" / "tiny" / "report.md").read_text()

    # Running the same sweep again without --resume must refuse, not duplicate runs.
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(spec)
