"""SLIM: GradCAM attention of an ERM reference model, a few attention annotations, label
propagation and a feature-balanced curated subset, then retraining (ALGORITHMS.md, "SLIM").

Everything up to the curated subset is cached (:mod:`debias.slim.pipeline`): a sweep over
retraining knobs (lr, weight decay, epochs, the last-layer grid) computes GradCAM and the
curation once. The trial is the retraining, in one of two modes (``slim.retrain``):

- ``full`` (the shared SGD loop): a fresh model (the sweep's backbone and weights) trained on
  the curated *train* subset;
- ``last_layer`` (the shared last-layer trial, :mod:`debias.last_layer`, as DFR's): L1
  logistic regression on the reference model's frozen features of curated subsets of one
  half of validation, over a grid of C and class weights, averaged over retrains; the other
  half selects. :mod:`debias.slim.modes` serves both modes.

SLIM reads no bias labels. Its simulated annotator stands in for a person: by attention IoU
with the foreground masks where the dataset has them, else by the known group (through the
bias audit's oracle; runs are tagged ``slim/simulated_annotator = 1``). ``annotator: random``
answers at random: the ablation that shows whether the annotations matter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from debias.last_layer import LastLayerParams, grid_size
from debias.methods.base import Method, SweepContext
from debias.params import Choice, Float, Int, Number, Text
from debias.slim.modes import (
    MODE_SPLITS,
    curation,
    curation_metrics,
    gradcam_examples,
    reference_for,
    sampling_seed,
    stage_requests,
    validation_halves,
)

if TYPE_CHECKING:
    from debias.spec import Spec

__all__ = ["SLIM", "SLIMParams"]

#: Knobs that change *which images* SLIM shows the annotator (the architecture through the
#: reference model's GradCAM). ``slim.retrain`` also does, but the request covers every mode
#: the sweep can take: its rows carry their split.
SAMPLING_KEYS = ("slim.budget_per_class", "slim.neighbours", "slim.embedding", "backbone.arch")


class SLIMParams(LastLayerParams):
    retrain: Literal["full", "last_layer"] = Choice("full")
    budget_per_class: int = Int(15, 1, 100_000, doc="images shown to the annotator per class")
    neighbours: int = Int(5, 1, 1000, doc="per centroid, pick among this many nearest")
    gamma: Number = Float(10.0, 0, 1e6, lo_open=True, doc="LabelSpreading's rbf gamma")
    alpha: Number = Float(0.01, 0, 1, lo_open=True, hi_open=True, searchable=False,
                          doc="LabelSpreading's clamping (about 0: keep the answers)")
    keep_quantile: Number = Float(0.5, 0, 1, hi_open=True,
                                  doc="keep instances scored above this quantile")
    curated_size: int = Int(120, 2, 10_000_000)
    k_max: int = Int(5, 2, 50, doc="elbow search over K in [2, k_max] on each space")
    cell_share: Literal["spread", "uniform"] = Choice("spread")
    embedding: Literal["pca", "umap"] = Choice("pca")
    annotator: Literal["simulated", "csv", "random"] = Choice(
        "simulated", searchable=False,
        doc="simulated: a stand-in person; csv: a person's answers; random: the ablation")
    annotations: str | None = Text(None, expected="the path of the annotation CSV")
    aiou_threshold: Number = Float(0.3, 0, 1)


class SLIM(Method):
    name = "slim"
    section = "slim"
    Params = SLIMParams
    summary = "GradCAM attention + a few annotations -> balanced curated subset -> retrain"

    # ------------------------------------------------------------------ sweep-time hooks

    @classmethod
    def trial_kind(cls, params: SLIMParams) -> str:
        return "last_layer" if params.retrain == "last_layer" else "epochs"

    @classmethod
    def shared_stages(cls, config: dict[str, Any], data: Any) -> list[Any]:
        return stage_requests(config, data)

    @classmethod
    def check(cls, ctx: SweepContext) -> None:
        slim = ctx.config["slim"]
        if "umap" in ctx.values_of("slim.embedding") and importlib.util.find_spec(
                "umap") is None:
            ctx.problems.append("slim.embedding: got 'umap'; expected 'pca' here, or install "
                                "umap-learn first (pip install -e '.[umap]')")
        if slim["annotator"] != "csv":
            return
        if not slim.get("annotations"):
            ctx.problems.append(
                "slim.annotations: missing; expected the path of the annotation CSV when "
                "slim.annotator is 'csv' (it is written for you to fill in if it does not "
                "exist)")
        else:
            slim["annotations"] = str(ctx.absolute(slim["annotations"]))
        searched = [p for p in ctx.searched() if p in SAMPLING_KEYS]
        if searched:
            ctx.problems.append(
                f"search.space: {', '.join(searched)} searched with slim.annotator 'csv'; "
                "expected these fixed (each value samples other images, and one annotation "
                "file answers one sampling)")

    @classmethod
    def steps(cls, ctx: SweepContext) -> str:
        assert isinstance(ctx.params, SLIMParams)
        modes = ctx.values_of("slim.retrain")
        epochs = ctx.epochs()
        points = f"{grid_size(ctx.params)} grid points (C x class weights)"
        if modes == {"full"}:
            return epochs
        if modes == {"last_layer"}:
            return points
        return f"{epochs} for slim.retrain full, {points} for slim.retrain last_layer"

    @classmethod
    def preflight(cls, spec: Spec, dry_run: bool) -> None:
        """With a person annotating, the file must hold rows for every retrain mode the
        sweep can take before trials start (see :func:`debias.annotate.check_request`)."""
        if spec.config["slim"]["annotator"] == "csv":
            from debias.annotate import check_request

            check_request(spec, dry_run)

    @classmethod
    def report_notes(cls, params: SLIMParams) -> list[str]:
        if params.annotator == "csv":
            return ["slim: a person's annotation file; the reference model, GradCAM and the "
                    "annotated sample are the same for every seed (a person annotates once), "
                    "so seeds vary the curation and the retraining only"]
        if params.annotator == "random":
            return ["slim: random answers in place of the annotator (an ablation)"]
        return ["slim: a simulated annotator (attention IoU with foreground masks where the "
                "dataset has them, else the known group) stands in for a person"]

    # ------------------------------------------------------------------ trial-time hooks

    def prepare(self) -> None:
        self.reference = reference_for(self.config, self.data, self.cache, self.device)
        if self.params.retrain != "full":
            return
        self.curation = curation(self.config, self.params, self.data, self.cache, self.device,
                                 self.reference, oracle=self.audit.oracle)
        self.positions = np.sort(self.curation["positions"].numpy())
        self._first_epoch = True

    def _report(self, cur: dict[str, Any], positions: np.ndarray) -> dict[str, Any]:
        model, ref_key = self.reference
        overlays: Path = gradcam_examples(self.config, self.data, model, self.device, ref_key,
                                          cur)
        mix = self.audit.group_mix(MODE_SPLITS[self.params.retrain], positions)
        return curation_metrics(cur, mix, positions, overlays)

    def train_positions(self) -> np.ndarray:
        return self.positions

    def epoch_metrics(self) -> dict[str, Any]:
        if not self._first_epoch:
            return {}
        self._first_epoch = False
        return self._report(self.curation, self.positions)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
        self._first_epoch = False

    # ------------------------------------------------------------------ last layer

    def fit_halves(self) -> tuple[np.ndarray, np.ndarray]:
        return validation_halves(self.data, sampling_seed(self.config))

    def reference_seed(self) -> int:
        return sampling_seed(self.config)

    def fit_subsets(self, fit_half: np.ndarray) -> list[np.ndarray]:
        curations = [curation(self.config, self.params, self.data, self.cache, self.device,
                              self.reference, retrain_index=r, oracle=self.audit.oracle)
                     for r in range(self.params.retrains)]
        subsets = [np.sort(c["positions"].numpy()) for c in curations]
        assert all(np.isin(s, fit_half).all() for s in subsets), "curated outside the fit half"
        self.curations = curations
        self._fit_report = self._report(curations[0], subsets[0])
        return subsets

    def fit_report(self) -> dict[str, Any]:
        return self._fit_report
