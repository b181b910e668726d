"""Learning-method tests: on the embedded dataset, with fixed seeds, every debiasing method
beats ERM on test worst-group accuracy by a clear margin (same backbone, same epochs).

The embedded benchmark (MNIST digits on land-like vs water-like photo backgrounds): the
background agrees with the target on 95% of training images, validation and test are
group-balanced, and ERM leans on the background and fails the rare groups. 16 px and 10
epochs keep the test fast; BENCHMARKS.md measures the converged, tuned comparison.

Every trial here runs on one torch thread: CPU numbers depend on the thread count (the
order of float sums), so a pinned count gives the same numbers on any machine. Each margin
below holds for seeds 0, 1 and 2 (measured; the test runs seed 0), so none rests on one
lucky draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from debias.spec import validate, with_params
from debias.trainable import build_trial

pytestmark = pytest.mark.slow

SETTING: dict[str, Any] = {
    "name": "effect", "targets": ["Odd"], "bias_attribute": "Background",
    "dataset": {"name": "synthetic", "image_size": 16, "spurious_correlation": 0.95},
    "backbone": {"arch": "small_cnn", "weights": "none"},
    "reference": {"epochs": 10, "lr": 0.05},
    "search": {"metric": "val/worst_group_acc"},
}
#: The same budget for every method that trains by SGD: 10 epochs over the 3,000 images.
TRAIN = {"epochs": 10, "batch_size": 64, "lr": 0.05, "scheduler": "cosine"}


def _final(tmp_path: Path, method: str, train: dict[str, Any] = TRAIN, **sections: Any
           ) -> dict:
    import torch

    spec = validate({**SETTING, "method": method, "train": train, **sections,
                     "storage": str(tmp_path)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trial = build_trial(with_params(spec.trial_base("Odd"), {"seed": 0}), device="cpu")
        history = list(trial.epochs())
    finally:
        torch.set_num_threads(threads)
    return {**history[0], **history[-1]}  # once-only facts (step 1) and the final selection


@pytest.fixture(scope="module")
def erm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = _final(tmp_path_factory.mktemp("erm"), "erm")
    assert out["test/avg_acc"] > 0.6  # it learns the task, mostly from the background
    return out


def test_oracle_groupdro_beats_erm_at_equal_budget(tmp_path: Path, erm: dict) -> None:
    dro = _final(tmp_path, "groupdro", groupdro={"eta": 0.01})
    # The rarest group's weight grew: q moved toward it.
    assert max(v for k, v in dro.items() if k.startswith("groupdro/q/")) > 0.25
    # Seeds 0-2: +0.26, +0.26, +0.24 over ERM's worst group.
    assert erm["test/worst_group_acc"] + 0.2 < dro["test/worst_group_acc"], (erm, dro)


def test_jtt_beats_erm_without_bias_labels(tmp_path: Path, erm: dict) -> None:
    jtt = _final(tmp_path, "jtt", jtt={"epochs_id": 2, "lambda_up": 5})
    # The error set is mostly the rare groups (0_1 and 1_0 here): what JTT upweights.
    rare = jtt["jtt/error_group/0_1"] + jtt["jtt/error_group/1_0"]
    assert rare / jtt["jtt/error_set_size"] > 0.5
    assert erm["test/worst_group_acc"] + 0.2 < jtt["test/worst_group_acc"], (erm, jtt)


def test_clusterfix_beats_erm_on_worst_group_accuracy(tmp_path: Path, erm: dict) -> None:
    # Four clusters per class (two backgrounds, each split once more); the README's loss
    # (target loss re-weighted, no pseudo-label term). Seeds 0-2: +0.53, +0.22, +0.27 over
    # ERM's worst group; with the package defaults (k 8, beta 0.5, the original code's
    # pseudo-only weights) the lift at this 10-epoch budget is small (+0.05, -0.02, +0.11).
    cfix = _final(tmp_path, "clusterfix",
                  clusterfix={"k": 4, "beta": 0.0, "cluster_loss": "both"})
    # The clusters found the hidden bias (each cluster is mostly one background) ...
    assert cfix["clusterfix/mean_purity"] > 0.8
    # ... and re-weighting them lifts the worst group well above ERM's.
    assert erm["test/worst_group_acc"] + 0.2 < cfix["test/worst_group_acc"], (erm, cfix)


def test_dfr_beats_erm_with_validation_bias_labels(tmp_path: Path, erm: dict) -> None:
    dfr = _final(tmp_path, "dfr")
    assert dfr["dfr/draw_size"] > 0 and dfr["last_layer/retrains"] == 1
    # The final head is fitted on balanced draws of all of validation (4 x 250 images).
    assert 900 <= dfr["last_layer/final_fit_size"] <= 1000  # 4 x the smallest group
    assert dfr["last_layer/final_retrains"] == 20
    assert erm["test/worst_group_acc"] + 0.3 < dfr["test/worst_group_acc"], (erm, dfr)


def test_slim_curates_a_less_biased_subset_and_beats_erm(tmp_path: Path, erm: dict) -> None:
    # The project's class-balanced curation over equal cells, keeping every image
    # (docs/methods.md's knobs): on this benchmark the reference's median cut and joint
    # curation can leave one class almost out of the subset (README, "SLIM ablations").
    # PCA instead of UMAP (its JIT compile) keeps the test fast.
    slim = _final(tmp_path, "slim", {"epochs": 30, "batch_size": 32, "lr": 0.05,
                                     "scheduler": "cosine"},
                  slim={"curated_size": 800, "embedding": "pca", "keep_quantile": 0.0,
                        "cell_share": "uniform", "curation": "class_balanced"})
    assert slim["slim/annotated_fraction"] < 0.02
    assert slim["slim/simulated_annotator"] == 1.0
    assert 0.1 < slim["slim/annotated_positive_share"] < 0.9  # the answers carry information
    size = slim["slim/curated_size"]
    assert size == 800
    # The curated subset holds more of the rare groups than the training set (5%) ...
    minority = slim["slim/curated_group/0_1"] + slim["slim/curated_group/1_0"]
    assert minority / size > 0.08
    # ... and retraining on it lifts the worst group above ERM's.
    assert erm["test/worst_group_acc"] + 0.1 < slim["test/worst_group_acc"], (erm, slim)


def test_slim_last_layer_beats_erm_with_few_annotations(tmp_path: Path, erm: dict) -> None:
    """DFR-style: L1 logistic regressions on the ERM reference model's own frozen features,
    fitted on a curated half of validation. The features hold the digit; the last layer
    decides what to read from them."""
    slim = _final(tmp_path, "slim", slim={"retrain": "last_layer", "embedding": "pca",
                                          "c_grid": [1.0, 0.1, 0.01], "retrains": 3,
                                          "class_weight_ratios": [1, 3],
                                          "keep_quantile": 0.0, "cell_share": "uniform",
                                          "curation": "class_balanced"})
    assert slim["slim/annotated"] == 30  # validation images; the training set has 3,000
    assert slim["last_layer/val_fit_size"] + slim["last_layer/val_selection_size"] == 1000
    assert erm["test/worst_group_acc"] + 0.3 < slim["test/worst_group_acc"], (erm, slim)
