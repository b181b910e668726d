"""ClusterFix: k-means pseudo-groups on frozen features, a multi-head model, and per-cluster
loss re-weighting smoothed with momentum (ALGORITHMS.md, "ClusterFix").

The expensive stage (features, k-means) is cached and shared by every trial; the trial is the
multi-head training. The per-sample weight arithmetic lives in :class:`ClusterWeights`, apart
from the model, so it can be checked on hand-made tensors.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from debias.data.grouped import SPLITS
from debias.methods.base import Method, SweepContext
from debias.models import Classifier
from debias.params import Choice, Float, Int, Number, Section
from debias.seeding import derive_seed
from debias.stage_plan import StageRequest
from debias.stages import features_key, features_requests, frozen_features

__all__ = ["ClusterFix", "ClusterFixParams", "ClusterWeights", "kmeans_per_class"]

KMEANS_VERSION = 3  # 2: keyed on the features stage key; 3: seeded from the trial's seed


def kmeans_per_class(features: dict[str, torch.Tensor], labels: dict[str, np.ndarray], k: int,
                     n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Global cluster ids c = local id + class * k for every split.

    k-means runs on each class's L2-normalised train features; with unit vectors, squared
    Euclidean distance is 2 - 2 cos, so this is k-means under cosine distance. Val/test
    samples join the nearest (cosine) normalised centroid of their own class.
    """
    from sklearn.cluster import KMeans  # where it runs: see debias/linear_heads.py

    out = {s: torch.empty(len(labels[s]), dtype=torch.long) for s in SPLITS}
    for t in range(n_classes):
        train_rows = np.flatnonzero(labels["train"] == t)
        x = features["train"][train_rows].numpy().astype(np.float64)
        n_clusters = min(k, len(train_rows))
        km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(x)
        centroids = F.normalize(torch.as_tensor(km.cluster_centers_, dtype=torch.float32), dim=1)
        out["train"][train_rows] = torch.as_tensor(km.labels_, dtype=torch.long) + t * k
        for s in ("val", "test"):
            rows = np.flatnonzero(labels[s] == t)
            if len(rows):
                sims = features[s][rows] @ centroids.T
                out[s][rows] = sims.argmax(1) + t * k
    return out


class ClusterWeights:
    """Per-sample loss buffers, per-cluster running sums and the momentum-smoothed weights.

    Cluster losses are kept as running sums updated by the difference between a sample's new
    and old buffered loss, so a step costs O(batch), not the original's O(2k * N) scan.
    """

    def __init__(self, clusters: torch.Tensor, n_clusters: int, momentum: float,
                 cluster_loss: str, beta: float, ema: str) -> None:
        self.clusters = clusters.long()
        self.n_clusters = n_clusters
        self.momentum = momentum
        self.cluster_loss = cluster_loss
        self.beta = beta
        self.ema = ema
        n = len(clusters)
        self.sizes = torch.bincount(self.clusters, minlength=n_clusters).double()
        # Buffers start equal (1.0), so the first weights are pure inverse cluster frequency.
        self.target_loss = torch.ones(n, dtype=torch.float64)
        self.pseudo_loss = torch.ones(n, dtype=torch.float64)
        self.target_sum = self.sizes.clone()
        self.pseudo_sum = self.sizes.clone()
        self.sample_ema = torch.ones(n, dtype=torch.float64)
        self.cluster_ema = torch.ones(n_clusters, dtype=torch.float64)

    def update_losses(self, idx: torch.Tensor, target_loss: torch.Tensor,
                      pseudo_loss: torch.Tensor) -> None:
        """Write a training batch's latest losses into the buffers and the running sums."""
        idx = idx.long()
        c = self.clusters[idx]
        t_new, p_new = target_loss.detach().double().cpu(), pseudo_loss.detach().double().cpu()
        self.target_sum.index_add_(0, c, t_new - self.target_loss[idx])
        self.pseudo_sum.index_add_(0, c, p_new - self.pseudo_loss[idx])
        self.target_loss[idx] = t_new
        self.pseudo_loss[idx] = p_new

    def cluster_losses(self) -> torch.Tensor:
        """L_c: mean buffered loss of each cluster (0 for an empty cluster)."""
        size = self.sizes.clamp(min=1)
        pseudo = self.pseudo_sum / size
        if self.cluster_loss == "pseudo":
            return pseudo
        return self.beta * pseudo + self.target_sum / size

    def raw_cluster_weights(self) -> torch.Tensor:
        """(L_c / sum L) * (N / n_c): loss share times inverse cluster frequency."""
        losses = self.cluster_losses()
        share = losses / losses.sum().clamp(min=1e-12)
        inv_freq = self.sizes.sum() / self.sizes.clamp(min=1)
        return share * inv_freq

    def batch_weights(self, idx: torch.Tensor) -> torch.Tensor:
        """Weights for a batch, normalised to mean 1, after the momentum EMA (which updates)."""
        idx = idx.long()
        c = self.clusters[idx]
        raw = self.raw_cluster_weights()
        if self.ema == "sample":
            w = raw[c]
            w = w / w.mean()
            w = (1 - self.momentum) * self.sample_ema[idx] + self.momentum * w
            self.sample_ema[idx] = w
        else:
            # One EMA per cluster, normalised so the dataset-average weight is 1.
            raw = raw / ((raw * self.sizes).sum() / self.sizes.sum())
            self.cluster_ema = (1 - self.momentum) * self.cluster_ema + self.momentum * raw
            w = self.cluster_ema[c]
        return (w / w.mean()).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"target_loss": self.target_loss, "pseudo_loss": self.pseudo_loss,
                "target_sum": self.target_sum, "pseudo_sum": self.pseudo_sum,
                "sample_ema": self.sample_ema, "cluster_ema": self.cluster_ema}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            setattr(self, name, value.clone().double())


class ClusterFixParams(Section):
    k: int = Int(8, 1, 1024, doc="clusters per class")
    beta: Number = Float(0.5, 0, 100, doc="weight of the pseudo-label loss ('head weight')")
    momentum: Number = Float(0.3, 0, 1, doc="weight of the *new* value in the weights' EMA")
    cluster_loss: Literal["pseudo", "both"] = Choice(
        "pseudo", doc="pseudo: the original code; both: its README (beta*pseudo + target)")
    ema: Literal["sample", "cluster"] = Choice("sample")
    features: Literal["auto", "backbone", "reference"] = Choice(
        "auto", doc="auto: the pretrained backbone, or the ERM reference model without one")


class ClusterFix(Method):
    name = "clusterfix"
    section = "clusterfix"
    Params = ClusterFixParams
    summary = "k-means pseudo-groups, multi-head model, cluster loss re-weighting (no bias labels)"
    extra_selection_metrics = ("val/worst_pseudo_group_acc",)

    @classmethod
    def check(cls, ctx: SweepContext) -> None:
        if "backbone" in ctx.values_of("clusterfix.features") and \
                ctx.config["backbone"].get("weights") == "none":
            ctx.problems.append(
                "clusterfix.features: got 'backbone'; expected 'reference' or 'auto' when "
                "backbone.weights is 'none' (random features cannot cluster)")

    @staticmethod
    def _source(params: ClusterFixParams, config: dict[str, Any]) -> str:
        if params.features == "auto":
            return "reference" if config["backbone"]["weights"] == "none" else "backbone"
        return params.features

    @classmethod
    def shared_stages(cls, config: dict[str, Any], data: Any) -> list[StageRequest]:
        # k-means (one per k, seconds) stays in the trial; features and their model do not.
        return features_requests(config, data, cls._source(cls.params_of(config), config))

    def prepare(self) -> None:
        p, data = self.params, self.data
        source = self._source(p, self.config)
        self.feature_source = source
        # Keyed on the features' own key, not a hash of the (possibly huge) matrix; a trial
        # whose k-means is cached never reads the features at all. The seed is the trial's:
        # search trials share one k-means, each reported seed draws its own.
        feats_key = features_key(self.config, data, source)
        inputs = {"features": feats_key, "k": p.k, "seed": derive_seed(self.seed, "kmeans")}

        def cluster() -> dict[str, torch.Tensor]:
            feats = frozen_features(self.config, data, self.cache, self.device, source)
            labels = {s: data.view(s).y for s in SPLITS}
            return kmeans_per_class(feats, labels, p.k, data.n_classes, inputs["seed"])

        self.k = p.k
        self.clusters = self.cache.get_or_compute("kmeans", KMEANS_VERSION, inputs, cluster)
        self.n_clusters = self.k * data.n_classes
        self.weights = ClusterWeights(self.clusters["train"], self.n_clusters, p.momentum,
                                      p.cluster_loss, p.beta, p.ema)
        self._batch_weights: list[torch.Tensor] = []
        self._first_epoch = True

    def heads(self) -> dict[str, int]:
        heads = {"target": self.data.n_classes}
        heads.update({f"pseudo_{t}": self.k for t in range(self.data.n_classes)})
        return heads

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        h = model.features(images)
        target_loss = F.cross_entropy(model.heads["target"](h), labels, reduction="none")
        local = (self.clusters["train"][positions] % self.k).to(labels.device)
        pseudo_loss = torch.zeros_like(target_loss)
        for t in range(self.data.n_classes):
            rows = labels == t  # each sample's pseudo loss uses the head of its true class
            if rows.any():
                pseudo_loss[rows] = F.cross_entropy(model.heads[f"pseudo_{t}"](h[rows]),
                                                    local[rows], reduction="none")
        self.weights.update_losses(positions, target_loss, pseudo_loss)
        w = self.weights.batch_weights(positions).to(target_loss.device)
        self._batch_weights.append(w.detach().cpu())
        return (target_loss * w).mean() + self.params.beta * pseudo_loss.mean()

    def epoch_metrics(self) -> dict[str, float]:
        w = torch.cat(self._batch_weights) if self._batch_weights else torch.ones(1)
        self._batch_weights = []
        per_cluster = self.weights.raw_cluster_weights()
        per_cluster = per_cluster / ((per_cluster * self.weights.sizes).sum()
                                     / self.weights.sizes.sum())
        out = {
            "clusterfix/weight_mean": float(w.mean()),
            "clusterfix/weight_std": float(w.std()) if len(w) > 1 else 0.0,
            "clusterfix/weight_min": float(w.min()),
            "clusterfix/weight_max": float(w.max()),
            "clusterfix/cluster_weight_max": float(per_cluster.max()),
            "clusterfix/cluster_weight_min": float(per_cluster.min()),
            "clusterfix/cluster_loss_max": float(self.weights.cluster_losses().max()),
        }
        if self._first_epoch:  # static facts about the clusters, logged once at step 1
            out.update(self.cluster_report())
            self._first_epoch = False
        return out

    def cluster_report(self) -> dict[str, float]:
        """Sizes and bias purity of the train clusters: did the clusters find the bias?
        (The purity is measured by the audit: the method itself never sees the labels.)"""
        sizes, purity = self.audit.purity(self.clusters["train"].numpy(), self.n_clusters)
        out = {f"clusterfix/cluster_size/{c}": float(sizes[c]) for c in range(self.n_clusters)}
        out.update({f"clusterfix/cluster_purity/{c}": float(purity[c])
                    for c in range(self.n_clusters) if not np.isnan(purity[c])})
        out["clusterfix/mean_purity"] = float(np.nansum(purity * sizes) / sizes.sum())
        return out

    def eval_metrics(self, split: str, preds: np.ndarray) -> dict[str, float]:
        """Worst accuracy over (class x cluster) pseudo-groups: selection without bias labels."""
        view = self.data.view(split)
        clusters = self.clusters[split].numpy()
        accs = [float((preds[m] == view.y[m]).mean())
                for c in np.unique(clusters) if (m := clusters == c).any()]
        return {f"{split}/worst_pseudo_group_acc": min(accs) if accs else float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.load_state_dict(state["weights"])
        self._first_epoch = False
