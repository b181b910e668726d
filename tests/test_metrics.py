"""Tests for debias.metrics against hand-computed values and an independent plain-Python loop."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from debias.metrics import GroupMetrics, group_metrics


def reference(pred, y, a, n_classes=2, n_bias=2, mix=None):
    """Deliberately naive re-implementation: one pass per group, plain Python only."""
    groups = {}
    for p, yi, ai in zip(pred, y, a, strict=True):
        hits, total = groups.get((yi, ai), (0, 0))
        groups[(yi, ai)] = (hits + (p == yi), total + 1)
    accs = {g: hits / total for g, (hits, total) in groups.items()}
    out = {
        "avg": sum(p == yi for p, yi in zip(pred, y, strict=True)) / len(y),
        "worst": min(accs.values()),
        "unbiased": sum(accs.values()) / len(accs),
        "accs": accs,
        "counts": {g: total for g, (_, total) in groups.items()},
        "missing": [(i, j) for i in range(n_classes) for j in range(n_bias) if (i, j) not in accs],
    }
    if mix is not None:
        w = {g: mix[g[0]][g[1]] for g in accs}
        out["weighted"] = sum(w[g] * accs[g] for g in accs) / sum(w.values())
    return out


def test_hand_case_with_missing_group():
    # (0,0): 3 samples, 2 right; (0,1): 1 sample, wrong; (1,0): none; (1,1): 2, both right
    y = [0, 0, 0, 0, 1, 1]
    a = [0, 0, 0, 1, 1, 1]
    pred = [0, 0, 1, 1, 1, 1]
    m = group_metrics(pred, y, a)
    assert isinstance(m, GroupMetrics)
    assert m.avg_acc == pytest.approx(4 / 6)
    assert m.group_acc == {(0, 0): pytest.approx(2 / 3), (0, 1): 0.0, (1, 1): 1.0}
    assert m.group_count == {(0, 0): 3, (0, 1): 1, (1, 1): 2}
    assert m.missing_groups == ((1, 0),)
    assert m.worst_group_acc == 0.0
    assert m.unbiased_acc == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert m.weighted_acc is None


def test_weighted_acc_hand_computed():
    # group accs: (0,0)=1/2, (0,1)=1, (1,0)=0, (1,1)=1; training mix 70/10/5/15 (counts)
    y = [0, 0, 0, 1, 1, 1]
    a = [0, 0, 1, 0, 1, 1]
    pred = [0, 1, 0, 0, 1, 1]
    mix = [[70, 10], [5, 15]]
    m = group_metrics(pred, y, a, train_group_mix=mix)
    assert m.weighted_acc == pytest.approx((70 * 0.5 + 10 * 1 + 5 * 0 + 15 * 1) / 100)
    proportions = np.array(mix) / 100
    assert group_metrics(pred, y, a, train_group_mix=proportions).weighted_acc == pytest.approx(0.6)
    assert m.worst_group_acc == 0.0 and m.avg_acc == pytest.approx(4 / 6)


def test_weighted_acc_renormalises_over_present_groups():
    y, a, pred = [0, 0, 1], [0, 0, 1], [0, 1, 1]  # (0,0)=0.5, (1,1)=1, others missing
    m = group_metrics(pred, y, a, train_group_mix=[[3, 100], [100, 1]])
    assert m.weighted_acc == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)
    assert set(m.missing_groups) == {(0, 1), (1, 0)}


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_cases(seed):
    rnd = random.Random(seed)
    n_classes, n_bias = rnd.choice([(2, 2), (3, 2), (2, 3)])
    n = rnd.randint(1, 40)
    y = [rnd.randrange(n_classes) for _ in range(n)]
    a = [rnd.randrange(n_bias) for _ in range(n)]
    pred = [rnd.randrange(n_classes) for _ in range(n)]
    mix = [[rnd.randint(1, 50) for _ in range(n_bias)] for _ in range(n_classes)]
    ref = reference(pred, y, a, n_classes, n_bias, mix)
    m = group_metrics(np.array(pred), np.array(y), np.array(a), n_classes, n_bias, mix)
    assert m.avg_acc == pytest.approx(ref["avg"])
    assert m.worst_group_acc == pytest.approx(ref["worst"])
    assert m.unbiased_acc == pytest.approx(ref["unbiased"])
    assert m.weighted_acc == pytest.approx(ref["weighted"])
    assert m.group_acc == pytest.approx(ref["accs"])
    assert m.group_count == ref["counts"]
    assert list(m.missing_groups) == ref["missing"]


def test_accepts_tensors_and_flattens():
    y = torch.tensor([0, 1, 1, 0])
    a = torch.tensor([1, 1, 0, 0])
    pred = torch.tensor([0, 0, 1, 0])
    m = group_metrics(pred, y, a, train_group_mix=torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    flat = m.as_flat("val")
    assert flat == {
        "val/avg_acc": 0.75,
        "val/worst_group_acc": 0.0,
        "val/unbiased_acc": 0.75,
        "val/weighted_acc": 0.75,
        "val/group_acc/0_0": 1.0,
        "val/group_acc/0_1": 1.0,
        "val/group_acc/1_0": 1.0,
        "val/group_acc/1_1": 0.0,
        "val/group_count/0_0": 1.0,
        "val/group_count/0_1": 1.0,
        "val/group_count/1_0": 1.0,
        "val/group_count/1_1": 1.0,
        # Class 0 (rows 0 and 3) is all right, class 1 (rows 1 and 2) half: worst 0.5.
        "val/class_acc/0": 1.0,
        "val/class_acc/1": 0.5,
        "val/worst_class_acc": 0.5,
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert "test/weighted_acc" not in group_metrics(pred, y, a).as_flat("test")


def test_flat_skips_missing_groups():
    flat = group_metrics([1, 1], [1, 1], [0, 0]).as_flat("t")
    assert "t/group_acc/1_0" in flat and "t/group_acc/0_0" not in flat
    assert flat["t/worst_group_acc"] == 1.0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        group_metrics([], [], [])
    with pytest.raises(ValueError, match="same length"):
        group_metrics([0, 1], [0], [0])
    with pytest.raises(ValueError, match="y values"):
        group_metrics([0], [2], [0])
    with pytest.raises(ValueError, match="a values"):
        group_metrics([0], [0], [-1])
    with pytest.raises(ValueError, match="1-D"):
        group_metrics([[0]], [[0]], [[0]])
    with pytest.raises(ValueError, match="shape"):
        group_metrics([0], [0], [0], train_group_mix=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="zero weight"):
        group_metrics([0], [0], [0], train_group_mix=[[0, 1], [1, 1]])
    with pytest.raises(ValueError, match="integer"):
        group_metrics([0.5], [0], [0])


def test_worst_class_accuracy_needs_no_bias_labels_hand_checked():
    """Worst-class accuracy is the minimum over classes of per-class accuracy: it ignores how
    a class splits into groups (SubpopBench's selection rule without bias labels)."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    a = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0])  # class 0: 3/4; class 1: 3/5
    m = group_metrics(pred, y, a)
    assert m.class_acc == {0: 0.75, 1: 0.6}
    assert m.worst_class_acc == pytest.approx(0.6)
    # The groups tell another story: (0, 1) and (1, 0) are each entirely wrong.
    assert m.worst_group_acc == 0.0
    # Permuting the bias labels never changes it.
    assert group_metrics(pred, y, a[::-1]).worst_class_acc == m.worst_class_acc
