"""What a sweep will cost, before it runs: the `estimate:` line of --dry-run, the decoded
cache's size in the plan, and `cache.decoded: local` refused where the disk cannot hold it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from debias.cache_space import (
    CacheSpaceError,
    alive_nodes,
    check_decoded_space,
    decoded_cache_lines,
)
from debias.cli import main
from debias.data import clear_cache
from debias.data.export_layouts import write_dataset
from debias.estimate import SWEEP_OVERHEAD_S, Rates, estimate, time_step
from debias.spec import load_spec, validate
from tests.conftest import tiny_sweep, write_sweep


@pytest.fixture(autouse=True)
def _fresh():
    clear_cache()
    yield
    clear_cache()


def _estimate_line(out: str) -> tuple[str, float]:
    lines = [line for line in out.splitlines() if line.startswith("estimate:")]
    assert len(lines) == 1, out
    seconds = re.search(r"\((\d+) s\)", lines[0])
    assert seconds, lines[0]
    return lines[0], float(seconds.group(1))


def test_dry_run_prints_the_work_and_a_wall_clock(tmp_path: Path, capsys) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    assert main([str(path), "--dry-run", "--images-per-s", "500"]) == 0
    line, seconds = _estimate_line(capsys.readouterr().out)
    # 2 targets x (2 search + 2 seeds) trials of 2 epochs over 900 training images
    assert "8 trials (4 search + 4 seeds), 16 epochs, 14,400 training images seen, 0 stage " \
           "computations" in line, line
    assert "the given rate of 500 training images/s per trial" in line
    assert seconds > SWEEP_OVERHEAD_S
    # timed here instead: a rate of this machine appears, and the seconds follow from it
    assert main([str(path), "--dry-run"]) == 0
    timed, _ = _estimate_line(capsys.readouterr().out)
    assert "timed here on cpu with 1 thread(s)" in timed


def test_the_wall_clock_follows_rate_slots_and_the_longest_chain(tmp_path: Path) -> None:
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path)))
    slow, fast = Rates(100, 300, "x"), Rates(200, 600, "x")
    one, two = estimate(spec, slow, 1), estimate(spec, slow, 2)
    assert one.train_images == two.train_images == 16 * 900
    assert estimate(spec, fast, 1).work_s < one.work_s
    assert two.wall_s < one.wall_s  # twice the slots: faster, not twice (the chain)
    assert two.wall_s >= two.chain_s + SWEEP_OVERHEAD_S
    assert one.wall_s == pytest.approx(one.work_s + SWEEP_OVERHEAD_S)


def test_stage_computations_are_counted_once_per_key(tmp_path: Path) -> None:
    sweep = tiny_sweep(tmp_path, method="jtt", targets=["Odd"], seeds=[0, 1, 2],
                       jtt={"epochs_id": 1, "lambda_up": 3})
    est = estimate(load_spec(write_sweep(tmp_path, sweep)), Rates(100, 300, "x"), 2)
    # the search seed's and each reported seed's error set, each computed once
    assert est.stages == 4 and set(est.stage_names) <= {"jtt_errors", "reference"}


def test_a_training_step_is_timed_on_this_machine(tmp_path: Path) -> None:
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path)))
    rates = time_step(spec, min_seconds=0.05)
    assert rates.train > 0 and rates.eval > 0 and "small_cnn at 16 px" in rates.where


@pytest.fixture(scope="module")
def birds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset("waterbirds", tmp_path_factory.mktemp("birds"), images=24,
                         size=(32, 32))


def _disk_raw(tmp_path: Path, root: Path, placement: str) -> dict:
    return {
        "name": "disk", "method": "erm", "targets": ["Object"], "bias_attribute": "Place",
        "dataset": {"name": "waterbirds", "root": str(root), "image_size": 224},
        "backbone": {"arch": "small_cnn", "weights": "none"}, "train": {"epochs": 1},
        "cache": {"decoded": placement, "local_dir": str(tmp_path / "local")},
        "resources": {"cpu": 1}, "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"},
        "storage": str(tmp_path / "results")}


def _disk_spec(tmp_path: Path, root: Path, placement: str):
    return validate(_disk_raw(tmp_path, root, placement), cwd=tmp_path)


def test_the_plan_says_how_big_the_decoded_cache_is(tmp_path: Path, birds: Path) -> None:
    from debias.sweep import describe_plan

    plan = describe_plan(_disk_spec(tmp_path, birds, "local"))
    assert re.search(r"decoded images \(cache.decoded: local\): 24 images x 256 x 256 x 3 = "
                     r"4\.5 MiB on each node's disk, under \S+/local/decoded", plan), plan
    assert not decoded_cache_lines(_disk_spec(tmp_path, birds, "off"))


def test_a_cache_the_disk_cannot_hold_is_refused_before_any_trial(
        tmp_path: Path, birds: Path, monkeypatch: pytest.MonkeyPatch, ray_local,
        capsys) -> None:
    import debias.cache_space as est

    spec = _disk_spec(tmp_path, birds, "local")
    check_decoded_space(spec)  # 4.5 MiB fit here
    check_decoded_space(spec, alive_nodes())
    monkeypatch.setattr(est, "decoded_bytes", lambda n, size: 10**15)  # a petabyte
    with pytest.raises(CacheSpaceError, match=r"need 931322\.57 GiB under \S+/local but the "
                                              r"disk has [\d.]+ GiB free"):
        check_decoded_space(spec)
    # on a running Ray each node is asked about its own disk, by a task placed there
    with pytest.raises(CacheSpaceError, match=r"the disk of node [\d.]+ has"):
        check_decoded_space(spec, alive_nodes())
    # and the commands: the dry run and the sweep refuse before any trial
    path = write_sweep(tmp_path, _disk_raw(tmp_path, birds, "local"))
    assert main([str(path), "--dry-run", "--images-per-s", "100"]) == 1
    assert "error: cache.decoded: the decoded images need" in capsys.readouterr().err
    from debias.sweep import SweepError, run_sweep

    with pytest.raises(SweepError, match=r"cache\.decoded: the decoded images need"):
        run_sweep(spec)
    assert not list((tmp_path / "results").glob("disk/tune/*/*"))
