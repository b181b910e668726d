"""The command line: exit codes and messages a user sees before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from debias.cli import main
from tests.conftest import tiny_sweep, write_sweep


def test_dry_run_prints_the_plan_and_runs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    assert main([str(path), "--dry-run", "--set", "seeds=[0, 1, 2]"]) == 0
    out = capsys.readouterr().out
    assert "targets: Odd (bias Background), Loopy (bias Background)" in out
    assert "trials in all: 10" in out  # 2 targets x (2 search + 3 seeds)
    assert "train.lr: float [0.01, 0.1] log" in out
    assert "dry run" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_invalid_file_exits_2_with_every_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    code = main([str(path), "--set", "train.lr=-1", "--set", "method=dro"])
    assert code == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "train.lr: got -1" in err and "method: got 'dro'" in err


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("method", ["erm", "slim with a person annotating"])
def test_missing_dataset_says_where_it_looked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, dry_run: bool) -> None:
    extra = {} if method == "erm" else {"method": "slim", "slim": {
        "annotator": "csv", "annotations": str(tmp_path / "ann.csv")}}
    sweep = tiny_sweep(tmp_path, dataset={"name": "waterbirds", "root": str(tmp_path / "wb")},
                       targets=["Object"], bias_attribute="Place", **extra)
    assert main([str(write_sweep(tmp_path, sweep)), *(["--dry-run"] if dry_run else [])]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "wb") in err and "metadata.csv" in err
    assert not (tmp_path / "ann.csv").exists()


def test_dry_run_of_a_sweep_awaiting_annotations_builds_no_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "ann.csv"
    sweep = tiny_sweep(tmp_path, method="slim", targets=["Odd"],
                       slim={"annotator": "csv", "annotations": str(csv_path)})
    assert main([str(write_sweep(tmp_path, sweep)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"slim.annotations {csv_path} has no rows yet for split(s) train" in out
    assert "dry run" in out
    assert not csv_path.exists() and not (tmp_path / "results").exists()


def test_report_before_any_run_says_so(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    assert main([str(path), "--report"]) == 1
    assert "run the sweep first" in capsys.readouterr().err


def test_missing_sweep_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err


def test_unreachable_tracking_server_and_ray_address_fail_before_any_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sweep = tiny_sweep(tmp_path, tracking={"uri": f"http://user:secret@127.0.0.1:{port}"})
    assert main([str(write_sweep(tmp_path, sweep)), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the MLflow tracking server" in err and "secret" not in err

    path = write_sweep(tmp_path, tiny_sweep(tmp_path), "ok.yaml")
    assert main([str(path), "--address", f"127.0.0.1:{port}"]) == 1
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


def test_slim_without_its_annotation_file_writes_the_request_before_any_trial(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "ann.csv"
    sweep = tiny_sweep(tmp_path, method="slim", targets=["Odd"], reference={"epochs": 1},
                       slim={"annotator": "csv", "annotations": str(csv_path),
                             "budget_per_class": 3})
    assert main([str(write_sweep(tmp_path, sweep))]) == 1
    out = capsys.readouterr()
    assert "annotation request was written there" in out.err and "--annotate" in out.err
    assert csv_path.is_file() and csv_path.read_text().count("\n") == 7  # header + 2 x 3
    # Built by a Ray task (a worker's GPU on a cluster, never the driver), its overlays
    # brought back beside the CSV, where the rows point.
    assert "in a Ray task" in out.out
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    assert all(Path(r["overlay_path"]).is_file() for r in rows)
    assert all(Path(r["overlay_path"]).parent == tmp_path / "ann_overlays" for r in rows)
    assert not (tmp_path / "results" / "tiny").exists()  # no trial, no Tune experiment


@pytest.mark.parametrize("flag", ["--report", "--export", "--sync", "--compare"])
def test_an_interrupt_in_a_command_after_a_sweep_is_one_line_and_exit_130(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        flag: str) -> None:
    """Ctrl-C while --report draws its plots (or --export, --sync, --compare work) used to
    end in a traceback: it is one line and exit 130, wherever it lands."""
    import debias.cli as cli
    from debias import tracking_writer

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_open_tracker", interrupted)
    monkeypatch.setattr(tracking_writer, "replay", interrupted)
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    extra = {"--report": ["--report"], "--export": ["--export", str(tmp_path / "out")],
             "--sync": ["--sync"], "--compare": ["--compare", "tiny"]}[flag]
    assert main([str(path), *extra]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


def test_exit_now_does_not_wait_for_idle_pool_threads(tmp_path: Path) -> None:
    """MLflow's artifact downloads leave idle thread-pool workers (not daemons); the exit
    used to join them for ever (`--export` never exited)."""
    import subprocess
    import sys

    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "from debias.cli import exit_now\n"
            "pool = ThreadPoolExecutor(2)\n"
            "assert pool.submit(lambda: 41 + 1).result() == 42\n"
            "exit_now(7)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=120,
                          env={**__import__("os").environ,
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 7


def test_every_printed_command_keeps_the_overrides_and_masks_credentials(
        tmp_path: Path) -> None:
    from debias.commands import sweep_command
    from debias.preflight import resume_command
    from debias.redaction import MaskedCredentials, unmask_uri
    from debias.spec import load_spec

    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    sets = ["name=other", "tracking.uri=http://bob:pa55-word@10.0.0.5:5000"]
    spec = load_spec(path, sets)
    for flag in ("--resume", "--sync", "--ui", "--annotate"):
        line = sweep_command(spec, flag)
        assert "--set name=other" in line and line.endswith(flag)
        assert "tracking.uri=http://***@10.0.0.5:5000" in line and "pa55-word" not in line
    assert resume_command(spec) == sweep_command(spec, "--resume")
    # Run as printed: the masked URI is completed from the environment, or refused.
    masked = "http://***@10.0.0.5:5000"
    import os

    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_USERNAME",
                                                  "MLFLOW_TRACKING_PASSWORD")}
    try:
        with pytest.raises(MaskedCredentials, match="MLFLOW_TRACKING_PASSWORD"):
            unmask_uri(masked)
        os.environ.update(MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD="pa55-word")
        uri, note = unmask_uri(masked)
        assert uri == "http://bob:pa55-word@10.0.0.5:5000" and "MLFLOW_TRACKING" in note
        assert unmask_uri("http://10.0.0.5:5000") == ("http://10.0.0.5:5000", None)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def test_the_writers_warnings_never_show_the_password(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MLflow's exception text quotes the URI; the writer's warnings went out unscrubbed."""
    import logging
    import socket

    from debias import tracking_writer as tw

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://carol:Xy7-secret@127.0.0.1:{port}"
    with caplog.at_level(logging.DEBUG, logger="debias.tracking_writer"):
        writer = tw.TrackingWriter(uri, "e", tmp_path / "j", retry_initial_s=0.05,
                                   retry_max_s=0.1, request_timeout_s=1)
        writer.submit(tw.ensure_run(("parent", "p"), name="p"))
        assert not writer.flush(3)
        writer.close(0.5)
    text = caplog.text + "".join(p.read_text() for p in (tmp_path / "j").glob("*"))
    assert "does not take writes" in text
    assert "Xy7-secret" not in text
