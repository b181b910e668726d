"""ClusterFix: the weight arithmetic on hand-made tensors, k-means and purity, cache reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from debias.cache import StageCache
from debias.methods.clusterfix import ClusterWeights, kmeans_per_class
from debias.metrics import cluster_purity
from debias.spec import validate, with_params
from debias.trainable import build_trial


def _weights(**kw: object) -> ClusterWeights:
    args = {"momentum": 0.3, "cluster_loss": "pseudo", "beta": 0.5, "ema": "sample", **kw}
    return ClusterWeights(torch.tensor([0, 0, 1, 2]), 3, **args)  # sizes 2, 1, 1; N = 4


def test_first_weights_are_loss_share_times_inverse_frequency_then_momentum() -> None:
    """Buffers start unseen: after the first batch only its clusters have a loss."""
    w = _weights()
    w.update_losses(torch.tensor([0, 2]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))
    # L = (1, 3, 0) (cluster 2 unseen): share (1/4, 3/4, 0) x N / n_c (2, 4, 4).
    torch.testing.assert_close(w.raw_cluster_weights(),
                               torch.tensor([0.5, 3.0, 0.0], dtype=torch.float64))
    batch = w.batch_weights(torch.tensor([0, 2]))
    # Raw (0.5, 3) / batch mean 1.75 = (2/7, 12/7); EMA from 1 with m = 0.3 weighting the new
    # value: (0.7 + 0.3 * 2/7, 0.7 + 0.3 * 12/7), stored, then divided by its mean again.
    ema = torch.tensor([0.7 + 0.3 * 2 / 7, 0.7 + 0.3 * 12 / 7], dtype=torch.float64)
    torch.testing.assert_close(w.sample_ema[[0, 2]], ema)
    torch.testing.assert_close(batch, (ema / ema.mean()).float())


def test_running_sums_equal_a_full_scan_and_cluster_loss_modes() -> None:
    w = _weights()
    w.update_losses(torch.tensor([0, 3]), torch.tensor([3.0, 0.5]), torch.tensor([2.0, 4.0]))
    w.update_losses(torch.tensor([0, 1]), torch.tensor([1.0, 5.0]), torch.tensor([6.0, 0.0]))
    scan_pseudo = torch.stack([w.pseudo_loss[w.clusters == c].mean() for c in range(3)])
    scan_target = torch.stack([w.target_loss[w.clusters == c].mean() for c in range(3)])
    torch.testing.assert_close(w.cluster_losses(), scan_pseudo)
    # Cluster 1 (sample 2) is unseen: its loss is 0, not a mean over unseen buffers.
    torch.testing.assert_close(w.cluster_losses(), torch.tensor([3.0, 0.0, 4.0],
                                                                dtype=torch.float64))
    both = _weights(cluster_loss="both", beta=0.5)
    both.load_state_dict(w.state_dict())
    torch.testing.assert_close(both.cluster_losses(), 0.5 * scan_pseudo + scan_target)
    # Loss share x inverse frequency: cluster 2 (loss 4, size 1) gets the largest weight.
    raw = w.raw_cluster_weights()
    torch.testing.assert_close(raw, torch.tensor([3 / 7 * 2, 0.0, 4 / 7 * 4],
                                                 dtype=torch.float64))


def test_cluster_ema_smooths_per_cluster() -> None:
    w = _weights(ema="cluster", momentum=0.5)
    w.update_losses(torch.arange(4), torch.ones(4), torch.ones(4))
    batch = w.batch_weights(torch.tensor([0, 1, 2, 3]))
    # Equal losses: per-cluster raw weights (2/3, 4/3, 4/3), already of dataset mean 1;
    # EMA from 1 with m = 0.5: (5/6, 7/6, 7/6).
    torch.testing.assert_close(w.cluster_ema, torch.tensor([5 / 6, 7 / 6, 7 / 6],
                                                           dtype=torch.float64))
    expected = torch.tensor([5 / 6, 5 / 6, 7 / 6, 7 / 6])
    torch.testing.assert_close(batch, expected / expected.mean())


def test_kmeans_per_class_offsets_ids_and_assigns_val_to_own_class() -> None:
    rng = np.random.default_rng(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator()
                                                        .manual_seed(0)), dim=1)
    y = {"train": np.repeat([0, 0, 1, 1], 25), "val": np.array([0, 1]), "test": np.array([1])}
    blob = np.repeat(np.arange(4), 25)
    feats = {"train": torch.nn.functional.normalize(
        centres[blob] + 0.01 * torch.as_tensor(rng.normal(size=(100, 8)), dtype=torch.float32),
        dim=1), "val": centres[[1, 2]], "test": centres[[3]]}
    ids = kmeans_per_class(feats, y, k=2, n_classes=2, seed=0)
    assert set(ids["train"][:50].tolist()) == {0, 1} and set(ids["train"][50:].tolist()) == {2, 3}
    # Each blob is one cluster; the val sample at blob 1's centre joins blob 1's cluster.
    assert ids["val"][0] == ids["train"][25] and ids["val"][1] == ids["train"][50]
    assert ids["test"][0] == ids["train"][99]
    again = kmeans_per_class(feats, y, k=2, n_classes=2, seed=0)
    assert all(torch.equal(ids[s], again[s]) for s in ids)


def test_cluster_purity() -> None:
    sizes, purity = cluster_purity(np.array([0, 0, 0, 1, 1, 3]), np.array([1, 1, 0, 0, 0, 1]), 4)
    assert sizes.tolist() == [3, 2, 0, 1]
    assert purity[0] == pytest.approx(2 / 3) and purity[1] == 1.0 and purity[3] == 1.0
    assert np.isnan(purity[2])


def test_a_second_trial_reuses_features_and_kmeans(tmp_path) -> None:
    spec = validate({
        "name": "t", "method": "clusterfix", "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": {"name": "synthetic", "image_size": 16, "size": 1500},
        "train": {"epochs": 1, "batch_size": 128}, "reference": {"epochs": 1},
        "clusterfix": {"k": 2}, "storage": str(tmp_path)})
    base = spec.trial_base("Odd")
    StageCache.reset_events()
    first = build_trial(with_params(base, {"clusterfix.momentum": 0.3}), "cpu")
    assert first.cache_events["cache/computed/features"] == 1
    assert first.cache_events["cache/computed/kmeans"] == 1
    # Another search trial (same search seed, another knob) shares every stage ...
    second = build_trial(with_params(base, {"clusterfix.momentum": 0.9}), "cpu")
    assert second.cache_events.get("cache/computed/features", 0) == 0
    assert second.cache_events.get("cache/computed/kmeans", 0) == 0
    assert second.cache_events.get("cache/computed/reference", 0) == 0
    assert second.cache_events["cache/reused/kmeans"] == 1
    assert torch.equal(first.method.clusters["train"], second.method.clusters["train"])
    # A different k needs new k-means but still the same features.
    third = build_trial(with_params(base, {"clusterfix.k": 3}), "cpu")
    assert third.cache_events["cache/computed/kmeans"] == 1
    assert third.cache_events.get("cache/computed/features", 0) == 0
    metrics = next(third.epochs())
    assert metrics["clusterfix/cluster_size/5"] > 0 and 0.5 <= metrics[
        "clusterfix/mean_purity"] <= 1.0
    assert "val/worst_pseudo_group_acc" in metrics
    assert metrics["stage/kmeans"] != next(first.epochs())["stage/kmeans"]
    # ... while a reported seed re-runs all of them: reference model, features, k-means.
    fresh = build_trial(with_params(base, {"clusterfix.momentum": 0.3, "seed": 1}), "cpu")
    for stage in ("reference", "features", "kmeans"):
        assert fresh.cache_events[f"cache/computed/{stage}"] == 1, stage
    assert fresh.stage_tags["stage/features"] != first.stage_tags["stage/features"]
