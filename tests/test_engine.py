"""The shared training loop: same seed gives the same numbers, and a trial resumed from a
checkpoint continues exactly as an uninterrupted one would have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from debias.models import build_classifier, build_trunk, cam_layer
from debias.spec import validate, with_params
from debias.trainable import build_trial
from tests.conftest import tiny_sweep


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("engine")
    spec = validate(tiny_sweep(tmp, train={"epochs": 3, "batch_size": 64, "lr": 0.05}),
                    cwd=tmp)
    return spec.trial_base("Odd")


def _numbers(metrics: dict[str, float]) -> dict[str, float]:
    """What a run computes: everything but the timings (perf/*), which no seed fixes."""
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def _run(config: dict, epochs: int | None = None) -> list[dict[str, float]]:
    torch.set_num_threads(1)
    trainer = build_trial(config, "cpu")
    out = []
    for metrics in trainer.epochs():
        assert metrics["perf/train_images_per_s"] > 0
        assert 0.0 <= metrics["perf/data_wait_frac"] <= 1.0
        out.append(_numbers(metrics))
        if epochs is not None and trainer.epoch == epochs:
            break
    return out


def test_same_seed_same_numbers_different_seed_different(base: dict) -> None:
    first, second = _run(base), _run(base)
    assert first == second  # exact, every metric of every epoch
    other = _run(with_params(base, {"seed": 1}))
    assert [m["train/loss"] for m in other] != [m["train/loss"] for m in first]
    assert [m["epoch"] for m in first] == [1, 2, 3]
    for m in first:
        assert {"val/worst_group_acc", "val/avg_acc", "val/group_acc/0_0", "selected/score",
                "test/worst_group_acc"} <= set(m)


def test_resume_from_checkpoint_matches_uninterrupted_run(base: dict, tmp_path: Path) -> None:
    straight = _run(base)
    torch.set_num_threads(1)
    trainer = build_trial(base, "cpu")
    first = _numbers(next(trainer.epochs()))
    trainer.save(tmp_path / "state.pt")
    resumed = build_trial(base, "cpu")
    resumed.load(tmp_path / "state.pt")
    rest = [_numbers(m) for m in resumed.epochs()]
    assert [first, *rest] == straight


def test_test_metrics_come_from_the_selected_epoch(base: dict) -> None:
    history = _run(with_params(base, {"train.epochs": 4, "train.lr": 0.2}))
    final = history[-1]
    best_epoch = int(final["selected/epoch"])
    scores = [m["val/worst_group_acc"] for m in history]
    assert final["selected/score"] == max(scores)
    assert best_epoch == 1 + scores.index(max(scores))
    # test/* reported at the end are those of the selected epoch, not the last one
    assert final["test/worst_group_acc"] == history[best_epoch - 1]["test/worst_group_acc"]


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_backbones_build_and_load_a_state_dict_path(arch: str, tmp_path: Path) -> None:
    model = build_classifier(arch, "none", {"target": 2, "pseudo_0": 4})
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 2)
    assert model.heads["pseudo_0"](model.features(x)).shape == (2, 4)
    assert isinstance(cam_layer(model), torch.nn.Module)
    torch.save(model.state_dict(), tmp_path / "w.pt")  # a whole classifier's state_dict
    trunk, _ = build_trunk(arch, str(tmp_path / "w.pt"))
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, model.trunk.state_dict()[key])


def test_weights_that_do_not_fit_are_rejected(tmp_path: Path) -> None:
    torch.save(build_classifier("resnet18", "none", {"target": 2}).state_dict(),
               tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="do not fit this backbone"):
        build_trunk("small_cnn", str(tmp_path / "r18.pt"))
