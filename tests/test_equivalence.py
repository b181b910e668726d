"""Each method computes what its reference implementation computes.

Every test writes the reference procedure itself, from the paper and the reference code's
documented behaviour (docs/methods.md names the file and function of each), on small fixed
inputs, and compares it with this project's implementation fed the same inputs (the same
draws, the same initial weights, the same batches). No reference code is imported or copied.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from debias.methods.clusterfix import ClusterWeights, class_mix_order, cosine_kmeans
from debias.methods.groupdro import GroupWeights
from debias.methods.jtt import upsampled_positions
from debias.spec import validate, with_params
from debias.trainable import build_trial

TINY: dict[str, Any] = {
    "name": "eq", "targets": ["Odd"], "bias_attribute": "Background",
    "dataset": {"name": "synthetic", "image_size": 16, "spurious_correlation": 0.9,
                "size": 1000},
    "backbone": {"arch": "small_cnn", "weights": "none"},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05},
    "reference": {"epochs": 2, "batch_size": 128, "lr": 0.05},
}


def _config(tmp_path: Path, method: str, **sections: Any) -> dict[str, Any]:
    spec = validate({**TINY, "method": method, **sections, "storage": str(tmp_path)})
    return with_params(spec.trial_base("Odd"), {"seed": 0})


# --------------------------------------------------------------------------- GroupDRO


class ReferenceLossComputer:
    """group_DRO's ``loss.py`` LossComputer, robust branch: per-group mean loss of the batch
    (absent groups 0), q <- q * exp(step_size * (L_g + adj / sqrt(n_g))) normalised, loss
    = L @ q; with every adjustment > 0 the adjustment is added in place to the very tensor
    the loss is computed from (its ``+=`` on an alias)."""

    def __init__(self, group_counts: np.ndarray, step_size: float, adj: float) -> None:
        self.counts = torch.as_tensor(group_counts, dtype=torch.float64)
        self.step_size = step_size
        self.adj = torch.full_like(self.counts, adj)
        self.q = torch.ones_like(self.counts) / len(self.counts)

    def loss(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        n = len(self.counts)
        group_map = (groups == torch.arange(n).unsqueeze(1)).double()
        count = group_map.sum(1)
        group_loss = (group_map @ losses) / (count + (count == 0).double())
        adjusted = group_loss
        if torch.all(self.adj > 0):
            adjusted += self.adj / torch.sqrt(self.counts)
        self.q = self.q * torch.exp(self.step_size * adjusted.data)
        self.q = self.q / self.q.sum()
        return group_loss @ self.q


@pytest.mark.parametrize("adjustment", [0.0, 2.0])
def test_groupdro_q_and_robust_loss_over_balanced_batches(tmp_path: Path,
                                                          adjustment: float) -> None:
    """Several steps of group-balanced batches (drawn by the method's own sampler) through
    both: the same q after every step; the same robust loss (the reference's adds the
    constant adjustment terms q . C/sqrt(n) to it, a quirk with no effect on gradients)."""
    config = _config(tmp_path, "groupdro", groupdro={"eta": 0.2, "adjustment": adjustment})
    trial = build_trial(config, "cpu")
    method = trial.method
    groups = method.groups.numpy()
    counts = np.bincount(groups, minlength=4)
    order = method.epoch_order(0, np.random.default_rng(0))
    assert len(order) == len(groups)  # an epoch of N draws, as the reference's sampler
    ours = GroupWeights(torch.as_tensor(counts), eta=0.2, adjustment=adjustment)
    reference = ReferenceLossComputer(counts, step_size=0.2, adj=adjustment)
    rng = np.random.default_rng(1)
    for start in range(0, 5 * 64, 64):
        batch = order[start:start + 64]
        losses = torch.as_tensor(rng.exponential(size=len(batch)))
        g = torch.as_tensor(groups[batch])
        expected = reference.loss(losses, g)
        got = ours.step(losses, g)
        torch.testing.assert_close(ours.q, reference.q, rtol=0, atol=1e-12)
        quirk = (adjustment / torch.sqrt(reference.counts)) @ reference.q if adjustment else 0.0
        torch.testing.assert_close(got.double(), expected - quirk, rtol=0, atol=1e-12)
    # Balanced draws: the reference's WeightedRandomSampler(N / n_g) draws every group
    # equally often in expectation, whatever its size.
    many = np.concatenate([method.epoch_order(e, np.random.default_rng(e)) for e in range(20)])
    np.testing.assert_allclose(np.bincount(groups[many], minlength=4) / len(many), 0.25,
                               atol=0.02)


# --------------------------------------------------------------------------- JTT


def test_jtt_error_set_and_multiplicity_match_the_reference_procedure(tmp_path: Path) -> None:
    """The reference: train ERM; during the training pass of (0-based) epoch T, record each
    batch's train-mode prediction before its optimiser step; the errors are added lambda_up
    more times to the training set. Here the procedure is a plain loop with the same initial
    weights and batches as the identification stage."""
    from debias.data import load_grouped, make_torch_dataset
    from debias.models import build_classifier
    from debias.seeding import derive_seed, seed_everything
    from debias.stages import reference_config

    T, lam = 1, 3
    config = _config(tmp_path, "jtt", jtt={"epochs_id": T, "lambda_up": lam})
    trial = build_trial(config, "cpu")
    ref = reference_config(config, epochs=T + 1)["train"]
    data = load_grouped(config["dataset"], "Odd", "Background")
    train = make_torch_dataset(data, "train", train=False)
    y = torch.as_tensor(np.array(data.view("train").y))
    seed = config["seed"]
    seed_everything(derive_seed(seed, "init"))
    model = build_classifier("small_cnn", "none", {"target": 2})
    opt = torch.optim.SGD(model.parameters(), lr=ref["lr"], momentum=ref["momentum"],
                          weight_decay=ref["weight_decay"])
    preds = np.full(len(y), -1)
    for epoch in range(T + 1):
        seed_everything(derive_seed(seed, "epoch", epoch))
        order = np.random.default_rng(derive_seed(seed, "order", epoch)).permutation(len(y))
        for start in range(0, len(order), ref["batch_size"]):
            batch = torch.as_tensor(order[start:start + ref["batch_size"]])
            model.train()
            logits = model(torch.stack([train[int(i)][0] for i in batch]))
            if epoch == T:
                preds[batch.numpy()] = logits.argmax(1).numpy()
            loss = F.cross_entropy(logits, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()  # the trainer scores validation after each epoch; nothing changes
    errors = preds != y.numpy()
    assert np.array_equal(trial.method.errors, errors) and 0 < errors.sum() < len(errors)
    counts = np.bincount(trial.method.train_positions(), minlength=len(y))
    assert np.array_equal(counts, 1 + lam * errors)
    assert np.array_equal(counts, np.bincount(upsampled_positions(len(y), errors, lam)))


# --------------------------------------------------------------------------- DFR


def test_dfr_selected_c_final_coefficients_and_test_predictions(tmp_path: Path) -> None:
    """``dfr_on_validation_tune`` then ``dfr_on_validation_eval`` with scikit-learn on the
    trial's own features and draws: for each C, a scaler fitted on the balanced draw of the
    fit half, an L1 liblinear fit, the held-out worst-group accuracy; the best C (first of
    ties); the final head: a scaler on all of validation, one fit per balanced draw of all of
    validation, coefficients and intercepts averaged; its test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from debias.seeding import derive_seed

    config = _config(tmp_path, "dfr", dfr={"c_grid": [1.0, 0.3, 0.07, 0.01],
                                           "final_retrains": 4})
    trial = build_trial(config, "cpu")
    history = list(trial.epochs())
    val = trial.data.view("val")
    x_val, x_test = trial.val_x, trial.features["test"]
    held = trial.held_out
    fit_half = np.setdiff1d(np.arange(len(val)), held)
    draw = trial.method.fit_subsets(fit_half)[0]
    scores = []
    for i, c in enumerate((1.0, 0.3, 0.07, 0.01)):
        scaler = StandardScaler().fit(x_val[draw])
        lr = LogisticRegression(C=c, solver="liblinear", l1_ratio=1.0,
                                random_state=derive_seed(trial.seed, "last-layer", i))
        lr.fit(scaler.transform(x_val[draw]), val.y[draw])
        pred = lr.predict(scaler.transform(x_val[held]))
        scores.append(min(np.mean(pred[val.group[held] == g] == val.y[held][val.group[held] == g])
                          for g in np.unique(val.group[held])))
    best = int(np.argmax(scores))
    assert history[-1]["selected/epoch"] == best + 1
    assert [m["val/worst_group_acc"] for m in history] == pytest.approx(scores, abs=1e-12)
    c = (1.0, 0.3, 0.07, 0.01)[best]
    scaler = StandardScaler().fit(x_val)
    coefs, intercepts = [], []
    seed = derive_seed(trial.seed, "last-layer-final")  # liblinear's shuffling: same draws
    for r, positions in enumerate(trial.method.final_subsets()):
        counts = np.bincount(val.group[positions], minlength=4)
        assert len(set(counts.tolist())) == 1  # group-balanced, all of validation
        lr = LogisticRegression(C=c, solver="liblinear", l1_ratio=1.0, random_state=seed + r)
        lr.fit(scaler.transform(x_val[np.sort(positions)]), val.y[np.sort(positions)])
        coefs.append(lr.coef_)
        intercepts.append(lr.intercept_)
    decision = scaler.transform(x_test) @ np.mean(coefs, axis=0)[0] + np.mean(intercepts)
    logits = trial.selected_head.logits(x_test)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, atol=1e-6)
    test = trial.data.view("test")
    preds = (decision > 0).astype(int)
    wga = min(np.mean(preds[test.group == g] == test.y[test.group == g]) for g in range(4))
    assert history[-1]["test/worst_group_acc"] == pytest.approx(wga, abs=1e-12)
    assert history[-1]["last_layer/final_fit_size"] == 4 * np.bincount(val.group).min()


# --------------------------------------------------------------------------- ClusterFix


class ReferenceClusterFix:
    """``trainers/cfix.py`` (trainer ``cfix``): per-sample loss buffers at -1 (unseen), the
    cluster loss the mean over seen members by a full scan (previous value, first 0, for a
    cluster with none), weights (L_c / sum L) * (N / n_c) over the batch, divided by their
    mean, a per-sample EMA weighting the new value by m (stored), divided by the mean."""

    def __init__(self, clusters: np.ndarray, n_clusters: int, m: float) -> None:
        self.clusters = clusters
        self.losses = -np.ones(len(clusters))
        self.weights = np.ones(len(clusters))
        self.cluster_losses = np.zeros(n_clusters)
        self.m = m
        self.n_clusters = n_clusters

    def step(self, ids: np.ndarray, pseudo_losses: np.ndarray) -> np.ndarray:
        self.losses[ids] = pseudo_losses
        for k in range(self.n_clusters):
            members = (self.clusters == k) & (self.losses >= 0)
            if members.any():
                self.cluster_losses[k] = self.losses[members].mean()
        counts = np.bincount(self.clusters, minlength=self.n_clusters)
        inverse = counts.sum() / counts
        share = self.cluster_losses / self.cluster_losses.sum()
        w = share[self.clusters[ids]] * inverse[self.clusters[ids]]
        w = w / w.mean()
        w = (1 - self.m) * self.weights[ids] + self.m * w
        self.weights[ids] = w
        return w / w.mean()


def test_clusterfix_weights_from_the_first_epoch_on() -> None:
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 6, size=200)
    clusters[:6] = np.arange(6)  # every cluster has a member
    ours = ClusterWeights(torch.as_tensor(clusters), 6, momentum=0.3, cluster_loss="pseudo",
                          beta=0.5, ema="sample")
    reference = ReferenceClusterFix(clusters, 6, m=0.3)
    for epoch in range(3):
        order = rng.permutation(200)
        for start in range(0, 200, 32):
            ids = order[start:start + 32]
            pseudo = rng.exponential(size=len(ids))
            ours.update_losses(torch.as_tensor(ids), torch.as_tensor(rng.random(len(ids))),
                               torch.as_tensor(pseudo))
            got = ours.batch_weights(torch.as_tensor(ids)).double().numpy()
            np.testing.assert_allclose(got, reference.step(ids, pseudo), rtol=1e-6,
                                       err_msg=f"epoch {epoch}, batch at {start}")


def test_clusterfix_cosine_kmeans_is_kmeans_pytorchs_lloyd() -> None:
    """kmeans_pytorch(distance='cosine'): start from k given points, assign by 1 - cos,
    centres = members' mean, until (sum of shifts)^2 < 1e-4; ours from the same start."""
    rng = np.random.default_rng(3)
    x = F.normalize(torch.as_tensor(rng.normal(size=(300, 8)) + np.repeat(
        rng.normal(scale=3, size=(3, 8)), 100, axis=0)), dim=1)
    start = np.random.default_rng(11).choice(300, size=3, replace=False)
    centres = x[torch.as_tensor(start)].clone()
    while True:
        cos = F.normalize(x, dim=1) @ F.normalize(centres, dim=1).T
        assign = (1 - cos).argmin(1)
        previous = centres.clone()
        centres = torch.stack([x[assign == c].mean(0) for c in range(3)])
        if float((centres - previous).norm(dim=1).sum()) ** 2 < 1e-4:
            break
    torch.testing.assert_close(cosine_kmeans(x, 3, seed=11), centres, rtol=0, atol=1e-12)


def test_clusterfix_class_mix_batches_hold_the_reference_counts() -> None:
    y = np.array([0] * 900 + [1] * 100)
    order = class_mix_order(y, 64, 0.1, np.random.default_rng(0))
    assert len(order) == (1000 // 64) * 64
    expected = np.round(64 * (0.1 / 2 + 0.9 * np.array([0.9, 0.1])))
    expected[np.argmax(expected)] += 64 - expected.sum()
    for start in range(0, len(order), 64):
        assert np.bincount(y[order[start:start + 64]], minlength=2).tolist() == \
            expected.astype(int).tolist()


# --------------------------------------------------------------------------- SLIM


def _embedding(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blobs = np.array([(-4.0, 0.0), (4.0, 1.0), (0.0, 5.0)])
    e = np.concatenate([b + rng.normal(scale=1.2, size=(40, 2)) for b in blobs])
    return e, np.repeat([0, 0, 1], 40)


def test_slim_propagation_matches_the_reference_on_a_fixed_embedding() -> None:
    """``propagate_core_spurious`` per class (gamma 10 and 5, alpha 1e-6): the class's
    embedding standardised by one mean and one std, LabelSpreading, P(1) min-max scaled;
    then the images above the median of all scores are kept."""
    from sklearn.semi_supervised import LabelSpreading

    from debias.slim.propagation import propagate

    e, y = _embedding(0)
    annotated = np.array([0, 1, 45, 46, 90, 91, 100, 110])
    labels = np.array([1, 1, 0, 0, 1, 0, 1, -1])
    gammas = [10.0, 5.0]
    expected = np.zeros(len(y))
    for c in (0, 1):
        rows = np.flatnonzero(y == c)
        points = e[rows]
        points = (points - points.mean()) / points.std()
        targets = np.full(len(rows), -1)
        for p, lab in zip(annotated, labels, strict=True):
            if y[p] == c:
                targets[np.flatnonzero(rows == p)[0]] = lab
        model = LabelSpreading(kernel="rbf", gamma=gammas[c], alpha=1e-6, max_iter=100_000)
        model.fit(points, targets)
        score = model.predict_proba(points)[:, 1]
        expected[rows] = (score - score.min()) / (score.max() - score.min())
    result = propagate(e, y, annotated, labels, gammas)
    np.testing.assert_allclose(result.scores, expected, atol=1e-9)
    np.testing.assert_array_equal(result.keep, expected > np.median(expected))


def test_slim_curation_matches_the_notebooks_procedure_on_a_fixed_embedding() -> None:
    """The notebook's curation over the kept images: elbow K from d2 = diff(diff(SSE)/2)/2,
    cells (i, j) weighted by the E-cluster's spread times the Ebar-cluster's spread within
    it, int(total x weight) images per cell. The same k-means fits (the project's seeded
    k-means) on both sides: what is compared is the arithmetic around them."""
    from debias.slim.clustering import kmeans
    from debias.slim.curation import curate_reference

    e, _ = _embedding(1)
    e_bar, _ = _embedding(2)
    kept = np.arange(0, 120, 2)
    total, seed = 30, 5
    pe, pb = e[kept], e_bar[kept]

    def elbow(x: np.ndarray) -> int:
        sse = [kmeans(x, k, seed).inertia_ for k in (2, 3, 4, 5)]
        d1 = np.diff(sse) / 2
        return (2, 3, 4, 5)[int(np.argmax(np.diff(d1) / 2)) + 1]

    def spread(x: np.ndarray) -> float:
        return float(np.median(np.linalg.norm(x - x.mean(0), axis=1))) if len(x) else 0.0

    k1, k2 = elbow(pe), elbow(pb)
    l1, l2 = kmeans(pe, k1, seed).labels_, kmeans(pb, k2, seed).labels_
    p1 = np.array([spread(pe[l1 == i]) for i in range(k1)])
    p1 = p1 / p1.sum()
    sizes = {}
    weights = np.zeros((k1, k2))
    for i in range(k1):
        p2 = np.array([spread(pb[(l1 == i) & (l2 == j)]) for j in range(k2)])
        weights[i] = p1[i] * p2 / p2.sum()
    weights = weights / weights.sum()
    for i in range(k1):
        for j in range(k2):
            if int(total * weights[i, j]):
                sizes[(i, j)] = int(total * weights[i, j])
    cur = curate_reference(e, e_bar, kept, total, (2, 5), seed)
    assert (cur.details[-1]["k_e"], cur.details[-1]["k_ebar"]) == (k1, k2)
    assert len(cur.positions) == sum(sizes.values())
    cell_of = {int(p): (int(a), int(b)) for p, a, b in zip(kept, l1, l2, strict=True)}
    got: dict[tuple[int, int], int] = {}
    for p in cur.positions:
        got[cell_of[int(p)]] = got.get(cell_of[int(p)], 0) + 1
    assert got == sizes
    assert math.isclose(sum(sizes.values()), total, abs_tol=k1 * k2)
