"""ClusterFix: k-means pseudo-groups on frozen features, a multi-head model, and per-cluster
loss re-weighting smoothed with momentum (ALGORITHMS.md, "ClusterFix"), as its reference
code computes them (ICCV11624/ICCV11624, ``trainers/cfix.py``, ``trainer: cfix``):

- k-means per target class with **cosine** distance on L2-normalised features (the reference
  calls ``kmeans_pytorch.kmeans(distance="cosine")``: Lloyd iterations assigning by
  1 - cos, each centre the plain mean of its members, until the centres move less than
  1e-4), initialised from k random points drawn from the trial's seed (the reference's draw
  is unseeded); validation and test images join the nearest centre (cosine) of their own
  class, and so do training images, by the final centres (:func:`cosine_kmeans`);
- per-sample loss buffers that start *unseen* (the reference's -1): a cluster's loss L_c is
  the mean buffered pseudo-head loss of its members seen so far (0 before any is seen), so
  the first epoch's weights are the reference's;
- weights w_i = (L_c / Σ L) · (N / n_c), divided by their batch mean, smoothed by a
  per-sample EMA that weights the *new* value by the momentum and is stored before the
  second normalisation; loss mean(CE_target · w) + β · mean(CE_pseudo);
- ``class_mix`` (the reference's CelebA sampler): every batch holds a fixed count per class,
  round(B · (α / n_classes + (1 - α) · p_c)), drawn in turn from each class's shuffled list
  (wrapping around, so a rare class repeats), N // B batches an epoch; off (a permutation)
  for Waterbirds, as in the reference.

The expensive stage (features) is cached and shared by every trial; k-means (seconds) is
cached per k and seed. The per-sample weight arithmetic lives in :class:`ClusterWeights`,
apart from the model, so it can be checked on hand-made tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
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
from debias.trial_config import TrialConfig

__all__ = ["ClusterFix", "ClusterFixParams", "ClusterWeights", "class_mix_order", "cosine_kmeans",
           "kmeans_per_class", "nearest_centre"]

KMEANS_VERSION = 4  # 4: cosine Lloyd iterations (the reference's), not scikit-learn's

#: kmeans_pytorch's stopping rule: (sum of the centres' shifts)^2 < tol.
KMEANS_TOL = 1e-4
#: A cap the reference does not have (it loops until converged): never reached in practice.
KMEANS_MAX_ITER = 1000


def cosine_kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The centres of k-means under cosine distance, as ``kmeans_pytorch.kmeans(...,
    distance="cosine")`` computes them: k distinct random points to start, then assign each
    point to its most similar centre and move each centre to the mean of its members, until
    the squared sum of the centres' shifts is below 1e-4. A centre left without members is
    moved to a random point (kmeans_pytorch's current rule; its 0.3 produced NaN)."""
    x = x.double()
    rng = np.random.default_rng(seed)
    centres = x[torch.from_numpy(rng.choice(len(x), size=k, replace=False))].clone()
    unit = F.normalize(x, dim=1)
    for _ in range(KMEANS_MAX_ITER):
        assign = (unit @ F.normalize(centres, dim=1).T).argmax(1)
        previous = centres.clone()
        for c in range(k):
            members = x[assign == c]
            centres[c] = members.mean(0) if len(members) else x[int(rng.integers(len(x)))]
        if float((centres - previous).norm(dim=1).sum()) ** 2 < KMEANS_TOL:
            break
    return centres


def nearest_centre(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar centre of every row (``kmeans_predict``)."""
    return (F.normalize(x.double(), dim=1) @ F.normalize(centres.double(), dim=1).T).argmax(1)


def kmeans_per_class(features: dict[str, torch.Tensor], labels: dict[str, np.ndarray], k: int,
                     n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Global cluster ids c = local id + class * k for every split: cosine k-means on each
    class's training features, every image of every split then joining the nearest final
    centre of its own class (so identical images share a cluster in every split)."""
    out = {s: torch.empty(len(labels[s]), dtype=torch.long) for s in SPLITS}
    for t in range(n_classes):
        train_rows = np.flatnonzero(labels["train"] == t)
        centres = cosine_kmeans(features["train"][train_rows], min(k, len(train_rows)),
                                derive_seed(seed, "class", t))
        for s in SPLITS:
            rows = np.flatnonzero(labels[s] == t)
            if len(rows):
                out[s][rows] = nearest_centre(features[s][rows], centres) + t * k
    return out


def class_mix_order(y: np.ndarray, batch_size: int, alpha: float,
                    rng: np.random.Generator) -> np.ndarray:
    """One epoch of the reference's CelebA sampler: N // B batches, each holding
    round(B · (α / n_classes + (1 - α) · p_c)) examples of class c (the rounding's remainder
    to the largest class), taken in turn from each class's list, shuffled at the epoch's
    start and read round and round; each batch shuffled."""
    y = np.asarray(y)
    classes = np.unique(y)
    p = np.array([np.mean(y == c) for c in classes])
    counts = np.round(batch_size * (alpha / len(classes) + (1 - alpha) * p)).astype(int)
    counts[np.argmax(counts)] += batch_size - counts.sum()
    lists = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    cursor = [0] * len(classes)
    batches = []
    for _ in range(len(y) // batch_size):
        batch = []
        for i, n in enumerate(counts):
            take = np.arange(cursor[i], cursor[i] + n) % len(lists[i])
            batch.append(lists[i][take])
            cursor[i] += n
        batches.append(rng.permutation(np.concatenate(batch)))
    return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)


class ClusterWeights:
    """Per-sample loss buffers, per-cluster running sums and the momentum-smoothed weights.

    Cluster losses are kept as running sums (and counts of members seen) updated by the
    difference between a sample's new and old buffered loss, so a step costs O(batch), not
    the original's O(2k * N) scan. Buffers start unseen, as the reference's -1.
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
        # Unseen until a training batch writes them (the reference's -1 marker).
        self.seen = torch.zeros(n, dtype=torch.bool)
        self.target_loss = torch.zeros(n, dtype=torch.float64)
        self.pseudo_loss = torch.zeros(n, dtype=torch.float64)
        self.seen_count = torch.zeros(n_clusters, dtype=torch.float64)
        self.target_sum = torch.zeros(n_clusters, dtype=torch.float64)
        self.pseudo_sum = torch.zeros(n_clusters, dtype=torch.float64)
        self.sample_ema = torch.ones(n, dtype=torch.float64)
        self.cluster_ema = torch.ones(n_clusters, dtype=torch.float64)

    def update_losses(self, idx: torch.Tensor, target_loss: torch.Tensor,
                      pseudo_loss: torch.Tensor) -> None:
        """Write a training batch's latest losses into the buffers and the running sums."""
        idx = idx.long().cpu()
        t_new, p_new = target_loss.detach().double().cpu(), pseudo_loss.detach().double().cpu()
        if len(torch.unique(idx)) < len(idx):  # a repeated example: its last loss is kept
            _, last = np.unique(idx.numpy()[::-1], return_index=True)
            keep = torch.from_numpy(len(idx) - 1 - last)
            idx, t_new, p_new = idx[keep], t_new[keep], p_new[keep]
        c = self.clusters[idx]
        self.seen_count.index_add_(0, c, (~self.seen[idx]).double())
        self.target_sum.index_add_(0, c, t_new - self.target_loss[idx])
        self.pseudo_sum.index_add_(0, c, p_new - self.pseudo_loss[idx])
        self.target_loss[idx] = t_new
        self.pseudo_loss[idx] = p_new
        self.seen[idx] = True

    def cluster_losses(self) -> torch.Tensor:
        """L_c: mean buffered loss of each cluster's members seen so far (0 before any)."""
        seen = self.seen_count.clamp(min=1)
        pseudo = self.pseudo_sum / seen
        if self.cluster_loss == "pseudo":
            return pseudo
        return self.beta * pseudo + self.target_sum / seen

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
                "sample_ema": self.sample_ema, "cluster_ema": self.cluster_ema,
                "seen": self.seen, "seen_count": self.seen_count}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            setattr(self, name, value.clone() if value.dtype == torch.bool
                    else value.clone().double())


class ClusterFixParams(Section):
    k: int = Int(8, 1, 1024, doc="clusters per class")
    beta: Number = Float(0.5, 0, 100, doc="weight of the pseudo-label loss ('head weight')")
    momentum: Number = Float(0.3, 0, 1, doc="weight of the *new* value in the weights' EMA")
    cluster_loss: Literal["pseudo", "both"] = Choice(
        "pseudo", doc="pseudo: the original code; both: its README (beta*pseudo + target)")
    ema: Literal["sample", "cluster"] = Choice("sample")
    features: Literal["auto", "backbone", "reference"] = Choice(
        "auto", doc="auto: the pretrained backbone, or the ERM reference model without one")
    class_mix: Number | None = Float(
        None, 0, 1, searchable=False,
        doc="alpha of the reference's CelebA batches: per batch, round(B * (alpha / classes "
            "+ (1 - alpha) * p_c)) of class c (its CelebA runs: 0.1); null: shuffled")


class ClusterFix(Method):
    name = "clusterfix"
    section = "clusterfix"
    Params = ClusterFixParams
    summary = "k-means pseudo-groups, multi-head model, cluster loss re-weighting (no bias labels)"
    extra_selection_metrics = ("val/worst_pseudo_group_acc",)

    @classmethod
    def figures(cls, target: Any, folder: Path) -> dict[str, tuple[Path, Any]]:
        return cluster_purity_figures(target, folder)

    @classmethod
    def check(cls, ctx: SweepContext) -> None:
        if "backbone" in ctx.values_of("clusterfix.features") and \
                ctx.sweep.backbone.weights == "none":
            ctx.problems.append(
                "clusterfix.features: got 'backbone'; expected 'reference' or 'auto' when "
                "backbone.weights is 'none' (random features cannot cluster)")

    @staticmethod
    def _source(params: ClusterFixParams, config: TrialConfig) -> str:
        if params.features == "auto":
            return "reference" if config.backbone.weights == "none" else "backbone"
        return params.features

    @classmethod
    def shared_stages(cls, config: TrialConfig, data: Any) -> list[StageRequest]:
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

    def epoch_order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        if self.params.class_mix is None:
            return rng.permutation(self.train_positions())
        return class_mix_order(self.data.view("train").y, self.config.train.batch_size,
                               float(self.params.class_mix), rng)

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


# ---------------------------------------------------------------------------- its figure
# Drawn by ``--report`` from MLflow (debias.plots.draw_sweep asks every method for its own
# figures); matplotlib is imported only here, never in a trial.

#: ClusterFix's per-cluster metrics as its trials log them (clusters numbered class by
#: class, ``k`` per target class).
_CLUSTER_METRIC = re.compile(r"^clusterfix/cluster_(size|purity)/(\d+)$")


def per_cluster(metrics: Mapping[str, float], kind: str) -> dict[int, float]:
    """{cluster: value} of ``clusterfix/cluster_<kind>/<c>`` (kind: size or purity)."""
    return {int(m.group(2)): v for key, v in metrics.items()
            if (m := _CLUSTER_METRIC.match(key)) and m.group(1) == kind}


def weighted_purity(sizes: Mapping[int, float], purity: Mapping[int, float]) -> float:
    """Size-weighted mean purity, as ClusterFix logs `clusterfix/mean_purity`: empty clusters
    (no purity) weigh nothing; NaN when there is nothing to weigh."""
    total = sum(sizes.values())
    if total <= 0:
        return math.nan
    return sum(sizes[c] * purity[c] for c in sizes
               if c in purity and math.isfinite(purity[c])) / total


def plot_cluster_purity(sizes: Mapping[int, float], purity: Mapping[int, float],
                        path: Path | str, title: str = "ClusterFix cluster purity",
                        clusters_per_class: int | None = None) -> Any:
    """Per ClusterFix cluster, its purity against the bias attribute (share of its majority
    bias value), annotated with its size, and a line at the size-weighted mean purity: near 1
    means the pseudo-groups found the bias; near the bias's base rate means they did not.

    Clusters are numbered class by class (``k`` per target class); give
    ``clusters_per_class`` to colour them by the class they split. The mean line has gid
    ``weighted_mean``. Returns the matplotlib Figure."""
    from matplotlib.patches import Patch

    from debias.plots import caption, new_figure, save_figure, set_title

    clusters = sorted(set(sizes) | set(purity))
    heights = [purity.get(c, math.nan) for c in clusters]
    heights = [h if math.isfinite(h) else 0.0 for h in heights]
    counts = [sizes.get(c, 0.0) for c in clusters]
    classes = [c // clusters_per_class if clusters_per_class else 0 for c in clusters]
    fig = new_figure(max(4.0, 1.5 + 0.45 * len(clusters)), 3.6)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(clusters)), heights, 0.8, color=[f"C{k}" for k in classes],
                  alpha=0.8)
    for bar, cluster, count in zip(bars, clusters, counts, strict=True):
        bar.set_gid(f"cluster {cluster}")
        ax.annotate(f"n={count:g}" if count else "empty", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize="x-small", rotation=90)
    mean = weighted_purity(dict(zip(clusters, counts, strict=True)), purity)
    handles: list[Any] = []
    if math.isfinite(mean):
        handles.append(ax.axhline(mean, color="black", linestyle="--", linewidth=1,
                                  gid="weighted_mean", label=f"size-weighted mean {mean:.2f}"))
    if clusters_per_class:
        handles += [Patch(color=f"C{k}", alpha=0.8, label=f"clusters of target class {k}")
                    for k in sorted(set(classes))]
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize="small")
    ax.set_xticks(range(len(clusters)), [str(c) for c in clusters])
    ax.set_xlabel("cluster" + (" (coloured by the target class it splits)"
                               if clusters_per_class else ""))
    ax.set_ylabel("purity w.r.t. the bias attribute")
    ax.set_ylim(0.0, 1.15)
    set_title(ax, title)
    caption(fig, "purity: the share of a cluster's training images that have its most "
                 "common bias value (1 = the cluster is one bias group); n: images in it")
    save_figure(fig, path, {"clusters": clusters, "sizes": counts, "purity": heights,
                            "weighted_mean": mean})
    return fig


def cluster_purity_figures(target: Any, folder: Path) -> dict[str, tuple[Path, Any]]:
    """``cluster_purity_<pipeline>``: the clusters of the pipeline's first finished seed run
    (``target``: a :class:`debias.plots.TargetRuns`); nothing if none logged clusters."""
    from debias.plots import safe_name

    first = next((r for r in target.seeds if per_cluster(r.data.metrics, "purity")), None)
    if first is None:
        return {}
    k = str(first.data.params.get("clusterfix.k", ""))
    path = Path(folder) / f"cluster_purity_{safe_name(target.key)}.png"
    fig = plot_cluster_purity(
        per_cluster(first.data.metrics, "size"), per_cluster(first.data.metrics, "purity"),
        path, title=f"{target.target}: {target.method} clusters vs {target.bias} "
                    f"(seed {first.data.tags.get('seed', '?')})",
        clusters_per_class=int(k) if k.isdigit() and int(k) > 0 else None)
    return {path.stem: (path, fig)}
