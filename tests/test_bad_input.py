"""Hostile and broken input, second catalogue (the first is tests/test_spec.py): every case is
refused before anything runs, with a message that names the problem, a non-zero exit code,
no traceback, and nothing written to MLflow or the storage. No case starts Ray.

Cases marked ``WIRED BY THE INTEGRATOR`` call a :mod:`debias.environment` check directly:
the driver calls it (see that module's docstring and the report of issue 15), but the CLI
does not reach it yet, so there is no command-line path to test here.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from debias.cli import main
from debias.environment import (
    EnvironmentProblem,
    check_environment,
    check_experiment,
    check_name,
    check_report_store,
    check_storage,
    check_tracking_uri,
    check_weights,
)
from debias.spec import SpecError, load_spec, parse_overrides
from tests.conftest import REPO, tiny_sweep, write_sweep

#: The integrator sets this to True once the driver (preflight, for runs and --dry-run) calls
#: debias.environment.check_environment(spec, resume) before anything is written; until then
#: the command-line form of those cases is skipped and the checks are tested directly.
DRIVER_WIRED = True

# --------------------------------------------------------------------------- helpers


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], code: int | None = None
             ) -> str:
    """Run the CLI in-process; it must refuse (non-zero, no traceback). Returns stderr."""
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse's parser.error
        got = exc.code
    err = capsys.readouterr().err
    assert got not in (0, None), err
    if code is not None:
        assert got == code, err
    assert "Traceback" not in err, err
    return err


def _nothing_written(tmp_path: Path) -> None:
    """tiny_sweep's MLflow store and storage folder were not created."""
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "results").exists()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sweep_text(tmp_path: Path, **overrides: Any) -> str:
    return yaml.safe_dump(tiny_sweep(tmp_path, **overrides), sort_keys=False)


def _write(tmp_path: Path, data: str | bytes, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The classic "billion laughs": ~500 bytes that expand to 10^9 strings.
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi",
                                                                   strict=True)]) + "\n"


# --------------------------------------------------------------------------- the sweep file


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _sweep_text(tmp_path)
    lines = text.splitlines()
    lr = next(i for i, line in enumerate(lines) if line.strip().startswith("lr:"))
    nested = "\n".join([*lines[:lr + 1], "  lr: 0.5", *lines[lr + 1:]]) + "\n"
    err = _refused(capsys, [str(_write(tmp_path, nested)), "--dry-run"], code=2)
    assert "train.lr: duplicate key" in err
    assert f"line {lr + 1}" in err and f"line {lr + 2}" in err
    _nothing_written(tmp_path)

    top = text + "seeds: [5]\n"
    first = next(i for i, line in enumerate(lines) if line.startswith("seeds:")) + 1
    err = _refused(capsys, [str(_write(tmp_path, top)), "--dry-run"], code=2)
    assert "seeds: duplicate key" in err
    assert f"line {first}" in err and f"line {len(lines) + 1}" in err
    _nothing_written(tmp_path)


def test_merge_keys_may_be_overridden_beside_them(tmp_path: Path) -> None:
    """`<<: *base` then a key of its own is YAML's override, not a duplicate."""
    sweep = tiny_sweep(tmp_path)
    sweep.pop("train")
    text = (yaml.safe_dump(sweep, sort_keys=False)
            + "reference: &ref {epochs: 2, lr: 0.02}\ntrain:\n  <<: *ref\n  lr: 0.05\n")
    spec = load_spec(_write(tmp_path, text))
    assert spec.config["train"]["lr"] == 0.05 and spec.config["train"]["epochs"] == 2


def test_an_alias_bomb_is_refused_without_being_expanded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = _sweep_text(tmp_path) + ALIAS_BOMB
    err = _refused(capsys, [str(_write(tmp_path, bomb)), "--dry-run"], code=2)  # it returns
    assert "expands to more than 100,000 nodes" in err and "aliases" in err
    _nothing_written(tmp_path)


def test_recursive_aliases_and_absurd_nesting_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, [str(_write(tmp_path, _sweep_text(tmp_path) + "x: &x [1, *x]\n")),
                            "--dry-run"], code=2)
    assert "recursive" in err and "*x" in err
    deep = _sweep_text(tmp_path) + "x: " + "[" * 10_000 + "]" * 10_000 + "\n"
    err = _refused(capsys, [str(_write(tmp_path, deep)), "--dry-run"], code=2)
    assert "nested more than 100 levels" in err
    _nothing_written(tmp_path)


def test_a_file_that_is_not_utf8_names_the_byte_offset(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = _sweep_text(tmp_path).encode()
    data = head + b"# caf\xe9 au lait\n"
    err = _refused(capsys, [str(_write(tmp_path, data)), "--dry-run"], code=2)
    assert "not UTF-8" in err and f"byte offset {len(head) + 5}" in err and "0xe9" in err
    err = _refused(capsys, [str(_write(tmp_path, _sweep_text(tmp_path).encode("utf-16"))),
                            "--dry-run"], code=2)
    assert "not UTF-8" in err and "UTF-16" in err and "byte offset 0" in err
    _nothing_written(tmp_path)


def test_a_control_character_is_a_yaml_error_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _sweep_text(tmp_path)
    err = _refused(capsys, [str(_write(tmp_path, text + "x: a\x00b\n")), "--dry-run"], code=2)
    assert f"at line {text.count(chr(10)) + 1}" in err and "#x0000" in err


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   # and another\n", "---\n",
                                  "null\n"])
def test_an_empty_file_says_it_is_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        text: str) -> None:
    err = _refused(capsys, [str(_write(tmp_path, text)), "--dry-run"], code=2)
    assert "the file is empty" in err and "NoneType" not in err


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("train.lr", ".nan", "NaN"),
    ("train.epochs", ".inf", "Infinity"),
    ("train.weight_decay", "-.inf", "-Infinity"),
    ("resources.cpu", ".nan", "NaN"),
    ("dataset.spurious_correlation", ".inf", "Infinity"),
])
def test_nan_and_infinity_are_refused_in_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str,
        shown: str) -> None:
    section, leaf = key.split(".")
    sweep = tiny_sweep(tmp_path)
    sweep.setdefault(section, {})[leaf] = "@VALUE@"
    text = yaml.safe_dump(sweep, sort_keys=False).replace("'@VALUE@'", value)
    err = _refused(capsys, [str(_write(tmp_path, text)), "--dry-run"], code=2)
    assert f"{key}: got {shown}" in err
    _nothing_written(tmp_path)


@pytest.mark.parametrize(("override", "fragment"), [
    ("train.lr=.inf", "train.lr: got Infinity"),
    ("train.lr=.nan", "train.lr: got NaN"),
    ("search.space={train.lr: {float: [0.01, .inf]}}", "search.space.train.lr.float"),
    ("search.space={train.lr: {choice: [0.1, .nan]}}", "search.space.train.lr.choice[1]"),
])
def test_nan_and_infinity_are_refused_in_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
        fragment: str) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    err = _refused(capsys, [str(path), "--dry-run", "--set", override], code=2)
    assert fragment in err
    _nothing_written(tmp_path)


@pytest.mark.parametrize(("override", "fragment"), [
    ("train={lr: 0.1, lr: 0.2}", "lr: duplicate key (at line 1, column 2 and again at line 1"),
    ("train.lr=" + "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
     "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
     "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]",
     "expands to more than 100,000 nodes"),
    ("train.lr=caf\udce9", "not UTF-8 (byte offset 3"),
    ("train.lr=# a comment", "is empty (only a comment)"),
])
def test_set_values_follow_the_rules_of_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
        fragment: str) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    err = _refused(capsys, [str(path), "--dry-run", "--set", override], code=2)
    assert fragment in err and "--set train" in err
    _nothing_written(tmp_path)


def test_set_does_not_change_a_key_that_aliases_the_one_set(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path)
    sweep.pop("train")
    text = (yaml.safe_dump(sweep, sort_keys=False)
            + "reference: &ref {epochs: 2, lr: 0.02}\ntrain: *ref\n")
    spec = load_spec(_write(tmp_path, text), ["reference.lr=0.03"])
    assert spec.config["reference"]["lr"] == 0.03 and spec.config["train"]["lr"] == 0.02


def test_an_undecodable_argument_is_refused_in_a_real_process(tmp_path: Path) -> None:
    """The bytes the shell passes, decoded by Python with surrogateescape."""
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    proc = subprocess.run([sys.executable, "launch.py", os.fsencode(path), "--dry-run",
                           b"--set", b"name=caf\xe9"], cwd=REPO, capture_output=True,
                          timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert "--set name: the value is not UTF-8 (byte offset 3" in err
    assert "Traceback" not in err
    _nothing_written(tmp_path)


def test_parse_overrides_and_load_spec_raise_spec_error(tmp_path: Path) -> None:
    """The library API (not only the CLI) refuses with SpecError."""
    with pytest.raises(SpecError, match="duplicate key"):
        parse_overrides(["train={lr: 1, lr: 2}"])
    with pytest.raises(SpecError, match="expands to more than"):
        load_spec(_write(tmp_path, ALIAS_BOMB))
    assert parse_overrides(["scheduler=null", "name="]) == [("scheduler", None), ("name", "")]


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(("args", "fragment"), [
    (["--ui", "--port", "70000"], "argument --port: got '70000'; expected a port number"),
    (["--ui", "--port", "-1"], "argument --port: got '-1'"),
    (["--annotate", "--port", "http"], "argument --port: got 'http'"),
    (["--num-cpus", "-3"], "argument --num-cpus: got '-3'; expected a whole number of CPUs"),
    (["--num-cpus", "0"], "argument --num-cpus: got '0'"),
])
def test_bad_port_and_num_cpus_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        fragment: str) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    err = _refused(capsys, [str(path), *args], code=2)
    assert fragment in err
    _nothing_written(tmp_path)


# --------------------------------------------------------------------------- tracking store


def _no_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return
    pytest.skip("psycopg is installed: no missing driver to report")


def test_a_missing_database_driver_names_the_package_and_hides_the_password() -> None:
    """WIRED BY THE INTEGRATOR (the driver's preflight calls check_tracking_uri; the CLI
    path is test_the_driver_refuses_a_bad_environment_before_anything_runs)."""
    _no_psycopg()
    with pytest.raises(EnvironmentProblem) as exc:
        check_tracking_uri("postgresql://u:hunter2@127.0.0.1:1/db")
    message = str(exc.value)
    assert 'pip install "psycopg[binary]"' in message and "psycopg2-binary" in message
    assert "hunter2" not in message and "postgresql://***@127.0.0.1:1/db" in message
    with pytest.raises(EnvironmentProblem) as exc:  # a one-letter password too
        check_tracking_uri("postgresql://u:p@127.0.0.1:1/db")
    assert ":p@" not in str(exc.value) and "pip install" in str(exc.value)
    with pytest.raises(EnvironmentProblem, match="pip install mysqlclient"):
        check_tracking_uri("mysql://u:p@127.0.0.1:1/db")
    try:  # the test extras install psycopg2 (the PostgreSQL concurrency tests use it)
        import psycopg2  # noqa: F401
    except ImportError:
        with pytest.raises(EnvironmentProblem, match="pip install psycopg2-binary"):
            check_tracking_uri("postgresql+psycopg2://u:p@127.0.0.1:1/db")
    else:
        with pytest.raises(EnvironmentProblem, match="cannot reach the database") as exc:
            check_tracking_uri("postgresql+psycopg2://u:hunter2@127.0.0.1:1/db")
        assert "hunter2" not in str(exc.value)


def _bad_sqlite(tmp_path: Path, case: str) -> tuple[Path, str]:
    """(the database path of a broken sqlite:/// store, what its refusal must say)."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    if case == "not a database":
        db.write_text("name,value\nthis is a CSV file, not SQLite\n")
        return db, "is not a SQLite database"
    if case == "a folder":
        db.mkdir()
        return db, "is a folder"
    if case == "another program's database":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE songs (title TEXT)")
        con.commit()
        con.close()
        return db, "not an MLflow store (its tables: songs)"
    if case == "no such folder":
        return tmp_path / "nowhere" / "mlflow.db", "does not exist; create it (mkdir -p"
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile" / "mlflow.db", "is a file, so no database can be created under it"


SQLITE_CASES = ["not a database", "a folder", "another program's database", "no such folder",
                "under a file"]


@pytest.mark.parametrize("case", SQLITE_CASES)
def test_a_bad_sqlite_store_is_refused_at_once(tmp_path: Path, case: str) -> None:
    """WIRED BY THE INTEGRATOR, like the missing driver."""
    db, fragment = _bad_sqlite(tmp_path, case)
    before = _digest(db) if db.is_file() else None
    with pytest.raises(EnvironmentProblem) as exc:
        check_tracking_uri(f"sqlite:///{db}")
    assert fragment in str(exc.value) and str(db.parent if case == "no such folder" else db) \
        in str(exc.value)
    assert (_digest(db) if db.is_file() else None) == before
    assert not (tmp_path / "nowhere").exists()


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    """An MLflow server stand-in: /health answers 200 to user:s3cr3tpw, 401 to others."""

    expected = "Basic " + base64.b64encode(b"user:s3cr3tpw").decode()

    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok and self.path == "/health" else 401 if not ok else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def auth_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_credentials_in_an_http_uri_work_and_are_never_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], auth_server: int) -> None:
    good = f"http://user:s3cr3tpw@127.0.0.1:{auth_server}"
    check_tracking_uri(good)  # sent as basic auth, not as part of the host name
    check_tracking_uri(good + "/")

    with pytest.raises(EnvironmentProblem) as exc:
        check_tracking_uri(f"http://user:wr0ngpw@127.0.0.1:{auth_server}")
    assert "refused the credentials in the URI (HTTP 401)" in str(exc.value)
    assert "wr0ngpw" not in str(exc.value)

    wrong_port = f"http://user:s3cr3tpw@127.0.0.1:{_free_port()}"
    sweep = tiny_sweep(tmp_path, tracking={"uri": wrong_port})
    err = _refused(capsys, [str(write_sweep(tmp_path, sweep)), "--dry-run"], code=1)
    assert "cannot reach the MLflow tracking server at http://***@127.0.0.1:" in err
    assert "s3cr3tpw" not in err
    with pytest.raises(EnvironmentProblem, match=r"not a number in 1\.\.65535") as exc:
        check_tracking_uri("http://user:s3cr3tpw@127.0.0.1:70000")
    assert "s3cr3tpw" not in str(exc.value)
    _nothing_written(tmp_path)


# --------------------------------------------------------------------------- MLflow experiments


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A sqlite store where 'tiny' was deleted and 'idle' exists without runs."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("tiny"))
    client.create_experiment("idle")
    return folder / "mlflow.db", uri


def test_report_on_a_missing_store_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    err = _refused(capsys, [str(path), "--report"], code=1)
    assert "no MLflow store" in err and "run the sweep first" in err
    _nothing_written(tmp_path)
    err = _refused(capsys, ["--compare", "tiny", "--tracking-uri",
                            f"sqlite:///{tmp_path / 'mlflow.db'}"], code=1)
    assert "no MLflow store" in err
    _nothing_written(tmp_path)


@pytest.mark.parametrize("name", ["tiny", "idle", "never"])
def test_report_on_a_deleted_missing_or_empty_experiment_writes_no_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], store: tuple[Path, str],
        name: str) -> None:
    db, uri = store
    before = _digest(db)
    sweep = tiny_sweep(tmp_path, name=name, tracking={"uri": uri})
    err = _refused(capsys, [str(write_sweep(tmp_path, sweep)), "--report"], code=1)
    fragment = {"tiny": "was deleted (id ", "idle": "has no runs in MLflow",
                "never": "no MLflow experiment 'never'"}[name]
    assert fragment in err
    assert ("mlflow experiments restore --experiment-id" if name == "tiny"
            else "nothing to report") in err
    assert not (tmp_path / "results").exists()  # no report.md, no report.csv, no plots
    assert _digest(db) == before


def test_a_deleted_experiment_says_how_to_restore_it(store: tuple[Path, str]) -> None:
    """WIRED BY THE INTEGRATOR: check_experiment runs in the driver before the Tracker is
    created (and --dry-run)."""
    db, uri = store
    before = _digest(db)
    with pytest.raises(EnvironmentProblem) as exc:
        check_experiment(uri, "tiny", resume=True)
    message = str(exc.value)
    assert "'tiny'" in message and "was deleted" in message
    assert "mlflow experiments restore --experiment-id" in message and uri in message
    assert "--set name=NEW_NAME" in message and "--resume" in message
    check_experiment(uri, "idle")  # active: fine
    check_experiment(uri, "fresh")  # absent: the sweep creates it
    with pytest.raises(EnvironmentProblem, match="was deleted"):
        check_report_store(uri, "tiny")
    assert _digest(db) == before


def test_checking_an_absent_store_does_not_create_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_tracking_uri(uri)
    check_experiment(uri, "tiny")
    with pytest.raises(EnvironmentProblem, match="no MLflow store"):
        check_report_store(uri, "tiny")
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- storage, name
# WIRED BY THE INTEGRATOR: check_name and check_storage run in the driver before anything is
# created under storage (first thing in run_sweep's preflight, and in --dry-run).


def test_storage_that_is_a_file_or_under_one_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "results"
    afile.write_text("not a folder")
    with pytest.raises(EnvironmentProblem, match=r"storage: .*results is a file, not a folder"):
        check_storage(afile)
    with pytest.raises(EnvironmentProblem,
                       match=r"storage: .*results/sub cannot be created: .*results is a file"):
        check_storage(afile / "sub")
    assert afile.read_text() == "not a folder"
    check_storage(tmp_path / "new" / "deeper")  # creatable: fine, and not created
    assert not (tmp_path / "new").exists()


def test_storage_in_an_unwritable_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (a path under a file is "
                        "tested in test_storage_that_is_a_file_or_under_one_is_refused)")
        with pytest.raises(EnvironmentProblem, match="locked is not writable"):
            check_storage(locked / "results")
        with pytest.raises(EnvironmentProblem, match="not writable"):
            check_storage(locked)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("name", ["cache", "compare", "Cache"])
def test_reserved_names_are_refused(name: str) -> None:
    with pytest.raises(EnvironmentProblem, match=f"name: got '{name}'; that name is reserved"):
        check_name(name)


def test_check_environment_runs_every_check(tmp_path: Path) -> None:
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path)))
    check_environment(spec)  # a good sweep passes, and nothing is created
    _nothing_written(tmp_path)
    (tmp_path / "results").write_text("x")
    with pytest.raises(EnvironmentProblem, match="storage"):
        check_environment(spec)
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path, name="cache")))
    with pytest.raises(EnvironmentProblem, match="reserved"):
        check_environment(spec)


# --------------------------------------------------------------------------- weights
# WIRED BY THE INTEGRATOR: check_weights runs in the driver's preflight (and --dry-run), once
# per sweep, before Ray starts; --dry-run calls these files valid until it is.


class _NotATensor:
    pass


@pytest.mark.parametrize("case", ["random bytes", "a pickled object", "a mapping of ints",
                                  "a list of tensors", "a whole model", "an empty file"])
def test_a_weights_file_that_is_not_weights_is_refused(tmp_path: Path, case: str) -> None:
    import torch

    path = tmp_path / "weights.pt"
    if case == "random bytes":
        path.write_bytes(os.urandom(4096))
        fragment = "is not a weights file that loads safely"
    elif case == "a pickled object":
        path.write_bytes(pickle.dumps(_NotATensor()))
        fragment = "is not a weights file that loads safely"
    elif case == "a mapping of ints":
        torch.save({"epoch": 3, "lr": 1}, path)
        fragment = "is not a state_dict: entry 'epoch' holds int"
    elif case == "a list of tensors":
        torch.save([torch.zeros(2)], path)
        fragment = "holds a list, not a state_dict"
    elif case == "a whole model":
        torch.save(torch.nn.Linear(2, 2), path)
        fragment = "a whole model saved with torch.save(model)"
    else:
        path.write_bytes(b"")
        fragment = "empty or truncated"
    with pytest.raises(EnvironmentProblem) as exc:
        check_weights(path)
    assert f"backbone.weights: {path}" in str(exc.value) and fragment in str(exc.value)
    assert "torch.save(model.state_dict(), PATH)" in str(exc.value)


def test_weights_that_are_a_state_dict_pass_and_must_fit_the_backbone(tmp_path: Path) -> None:
    import torch

    from debias.models import build_trunk

    good = tmp_path / "cnn.pt"
    torch.save(build_trunk("small_cnn", "none")[0].state_dict(), good)
    check_weights(good)
    check_weights(good, "small_cnn")
    wrapped = tmp_path / "wrapped.pt"  # a training checkpoint: {"state_dict": {...}, ...}
    torch.save({"state_dict": {f"trunk.{k}": v for k, v in
                               build_trunk("small_cnn", "none")[0].state_dict().items()}},
               wrapped)
    check_weights(wrapped, "small_cnn")
    other = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(EnvironmentProblem, match=r"does not fit backbone\.arch small_cnn"):
        check_weights(other, "small_cnn")
    for value in ("none", "imagenet", None):
        check_weights(value)
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(
        tmp_path, backbone={"arch": "small_cnn", "weights": str(other)})))
    with pytest.raises(EnvironmentProblem, match="does not fit"):
        check_environment(spec)


# --------------------------------------------------------------------------- through the driver

DRIVER_CASES = ["missing driver", *(f"sqlite: {c}" for c in SQLITE_CASES), "storage is a file",
                "reserved name", "weights are random bytes", "deleted experiment"]


@pytest.mark.skipif(not DRIVER_WIRED, reason="WIRED BY THE INTEGRATOR: the driver does not "
                                             "call debias.environment.check_environment yet")
@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("case", DRIVER_CASES)
def test_the_driver_refuses_a_bad_environment_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], store: tuple[Path, str],
        case: str, dry_run: bool) -> None:
    """The command line refuses each case before Ray starts and before anything is written
    (a refusal that did not happen would start Ray here: the case fails, loudly)."""
    over: dict[str, Any] = {}
    kept: Path | None = None  # a file that must be left as it was
    if case == "missing driver":
        _no_psycopg()
        over["tracking"] = {"uri": "postgresql://u:hunter2@127.0.0.1:1/db"}
        fragment = "pip install"
    elif case.startswith("sqlite: "):
        db, fragment = _bad_sqlite(tmp_path, case.removeprefix("sqlite: "))
        over["tracking"] = {"uri": f"sqlite:///{db}"}
        kept = db if db.is_file() else None
    elif case == "storage is a file":
        kept = tmp_path / "results"
        kept.write_text("not a folder")
        fragment = "is a file, not a folder"
    elif case == "reserved name":
        over["name"] = "cache"
        fragment = "that name is reserved"
    elif case == "weights are random bytes":
        weights = tmp_path / "weights.pt"
        weights.write_bytes(os.urandom(4096))
        over["backbone"] = {"arch": "small_cnn", "weights": str(weights)}
        fragment = "is not a weights file that loads safely"
    else:
        kept = store[0]
        over["tracking"] = {"uri": store[1]}
        fragment = "mlflow experiments restore --experiment-id"
    before = _digest(kept) if kept is not None else None
    path = write_sweep(tmp_path, tiny_sweep(tmp_path, **over))
    err = _refused(capsys, [str(path), *(["--dry-run"] if dry_run else [])])
    assert fragment in err and "hunter2" not in err
    if kept is not None:
        assert _digest(kept) == before
    assert not (tmp_path / "mlflow.db").exists()
    assert case == "storage is a file" or not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- issue 22, #8


@pytest.mark.parametrize("key", ["seeds", "search.seed", "search.trial_seed", "dataset.seed"])
def test_seeds_beyond_what_the_samplers_take_are_refused_before_anything_runs(
        tmp_path: Path, key: str) -> None:
    """2**32 passed --dry-run and the sweep died in Optuna once Ray was up."""
    from debias.spec import MAX_SEED

    big = [2**32] if key == "seeds" else 2**32
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    with pytest.raises(SpecError, match=rf"{key}: got .*4294967296.*4294967295"):
        load_spec(path, [f"{key}={big}"])
    load_spec(path, [f"{key}={[MAX_SEED] if key == 'seeds' else MAX_SEED}"])  # the largest
    import numpy as np

    np.random.RandomState(MAX_SEED)  # what Optuna's samplers build from it


@pytest.mark.parametrize("folder", ["/", "/etc", "/usr/lib/debias", "/proc/self"])
def test_storage_may_not_be_a_system_folder(tmp_path: Path, folder: str) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path, storage=folder))
    with pytest.raises(SpecError, match=r"storage: got .*not a system folder"):
        load_spec(path)


def test_a_method_module_is_not_imported_before_the_file_is_otherwise_valid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`method: mod:Class` imported (ran) the module before refusing the file."""
    package = tmp_path / "mods" / "hostile"
    package.mkdir(parents=True)
    marker = tmp_path / "RAN"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('init')\n")
    (package / "bad.py").write_text(f"open({str(marker)!r}, 'a').write('bad')\n"
                                    "class NotAMethod:\n    pass\n"
                                    "from debias.methods.erm import ERM as Alias\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    cases = {"hostile.bad:Missing": "has no class 'Missing'",
             "hostile.bad:NotAMethod": "has no base class",
             "hostile.nothere:X": "no module 'hostile.nothere'",
             "hostile.bad:Alias": "not imported yet"}  # exists; the file has another problem
    for value, expected in cases.items():
        path = write_sweep(tmp_path, tiny_sweep(tmp_path, method=value))
        with pytest.raises(SpecError, match=expected):
            load_spec(path, ["train.lr=-1"] if value.endswith(":Alias") else [])
        assert not marker.exists(), value
    # Otherwise valid: now it is imported, and must be a Method.
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path, method="hostile.bad:Alias")))
    assert marker.read_text() == "initbad" and spec.method == "hostile.bad:Alias"


def test_an_embedded_dataset_too_big_for_memory_is_refused_before_it_is_generated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run at 1024 px took 18.5 GB of a 23 GB machine; at size 5000 it needs ~200 GB."""
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    code = main([str(path), "--dry-run", "--set", "dataset.image_size=1024", "--set",
                 "dataset.size=5000"])
    assert code == 1
    err = capsys.readouterr().err
    assert "image_size 1024 with size 5000" in err and "GiB of memory" in err
    assert "dataset.image_size" in err
