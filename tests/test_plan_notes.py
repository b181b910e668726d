"""What the plan says about how the file and the command line combined: ``--set methods=[...]``
narrowing a study drops (and names) the search keys of the methods it no longer runs; a
``--set`` of a searched key is named as overridden by the search; a dataset path that came from
an environment variable is traced back to it when the data is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from debias.cli import main
from debias.spec import SpecError, load_spec
from debias.sweep import describe_plan
from tests.conftest import REPO, tiny_sweep, write_sweep

QUICKSTART = REPO / "sweeps" / "quickstart.yaml"


def _local(tmp_path: Path) -> list[str]:
    return [f"storage={tmp_path / 'results'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def test_narrowing_a_study_drops_the_search_keys_of_methods_it_no_longer_runs(
        tmp_path: Path) -> None:
    full = load_spec(QUICKSTART, _local(tmp_path))
    own = {d.path for d in full.space} - {d.path for d in full.space if
                                          d.path.startswith("train.")}
    assert "groupdro.eta" in own and full.notes == ()
    spec = load_spec(QUICKSTART, [*_local(tmp_path), "methods=[erm, jtt]"])
    assert spec.methods == ["erm", "jtt"]
    assert "groupdro.eta" not in {d.path for d in spec.space}
    assert {d.path for d in spec.space} == {d.path for d in full.space} - {
        k for k in own if not k.startswith(("jtt.", "erm."))}
    plan = describe_plan(spec)
    assert "note: --set methods=['erm', 'jtt']: groupdro not run, so its search key(s) " \
           "search.space.groupdro.eta dropped" in plan


def test_a_key_of_a_method_the_file_never_runs_is_still_refused(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, methods=["erm", "jtt"], targets=["Odd"])
    del sweep["method"]
    sweep["search"]["space"]["groupdro.eta"] = {"float": [0.001, 0.1], "log": True}
    path = write_sweep(tmp_path, sweep)
    with pytest.raises(SpecError, match=r"search\.space\.groupdro\.eta: a key of method groupdro"):
        load_spec(path)
    with pytest.raises(SpecError, match=r"search\.space\.groupdro\.eta: a key of method groupdro"):
        load_spec(path, ["methods=[erm]"])


def test_a_set_of_a_searched_key_is_named_in_the_plan(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = load_spec(QUICKSTART, [*_local(tmp_path), "train.epochs=2"])
    epochs = next(d for d in spec.space if d.path == "train.epochs")
    assert len(spec.notes) == 1
    assert spec.notes[0] == (
        f"--set train.epochs=2: train.epochs is searched ({epochs.describe()}), so the "
        "search's values are used; to fix it, --set \"search.space.train.epochs={choice: [2]}\"")
    fixed = load_spec(QUICKSTART, [*_local(tmp_path), "search.space.train.epochs={choice: [2]}"])
    assert fixed.notes == ()
    assert next(d for d in fixed.space if d.path == "train.epochs").values == (2,)
    # Not searched: nothing to say.
    assert load_spec(QUICKSTART, [*_local(tmp_path), "train.batch_size=32"]).notes == ()

    assert main([str(QUICKSTART), "--dry-run", *(a for o in _local(tmp_path)
                                                 for a in ("--set", o)),
                 "--set", "train.epochs=2", "--set", "methods=[erm, jtt]"]) == 0
    out = capsys.readouterr().out
    assert "train.epochs is searched" in out and "groupdro not run" in out


@pytest.mark.parametrize("value", [None, "set"])
def test_a_missing_dataset_names_the_variable_its_path_came_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("DEBIAS_TEST_DATA", raising=False)
    else:
        monkeypatch.setenv("DEBIAS_TEST_DATA", str(tmp_path / "mine"))
    sweep = tiny_sweep(tmp_path, dataset={"name": "waterbirds",
                                          "root": "${DEBIAS_TEST_DATA:-nowhere}/waterbirds"},
                       targets=["Object"], bias_attribute="Place")
    monkeypatch.chdir(tmp_path)
    assert main([str(write_sweep(tmp_path, sweep)), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "dataset.root is '${DEBIAS_TEST_DATA:-nowhere}/waterbirds' in the sweep file" in err
    if value is None:
        assert "DEBIAS_TEST_DATA is not set, so its default 'nowhere' was used" in err
        assert str(tmp_path / "nowhere" / "waterbirds") in err
    else:
        assert f"DEBIAS_TEST_DATA={str(tmp_path / 'mine')!r}" in err
    assert "export DEBIAS_TEST_DATA=" in err
