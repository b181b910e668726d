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
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import ValidationInfo, field_validator

from debias.last_layer import LastLayerParams, grid_size
from debias.methods.base import BiasLabels, Method, SweepContext
from debias.params import Choice, Float, Floats, Int, Number, Text
from debias.slim.annotations import AnnotationError
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
    from debias.trial_config import TrialConfig

__all__ = ["SLIM", "SLIMParams"]

#: Knobs that change *which images* SLIM shows the annotator (the architecture through the
#: reference model's GradCAM). ``slim.retrain`` also does, but the request covers every mode
#: the sweep can take: its rows carry their split.
SAMPLING_KEYS = ("slim.budget_per_class", "slim.neighbours", "slim.embedding", "backbone.arch")


#: The reference's last-layer grid (``linear_model_training.py``): 11 C values x 28 class
#: weights ({0: 1, 1: w} and {0: w, 1: 1} for 14 ratios).
SLIM_C_GRID = [1.0, 0.7, 0.5, 0.3, 0.1, 0.07, 0.05, 0.03, 0.01, 0.007, 0.003]
SLIM_CLASS_WEIGHTS = [1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 50.0, 80.0, 100.0, 200.0, 300.0,
                      500.0, 1000.0]


class SLIMParams(LastLayerParams):
    retrain: Literal["full", "last_layer"] = Choice("full")
    budget_per_class: int = Int(15, 1, 100_000, doc="images shown to the annotator per class")
    neighbours: int = Int(5, 1, 1000, doc="per centroid, pick among this many nearest")
    gamma: list[Number] = Floats(
        [10.0, 5.0], expected="a non-empty list of numbers > 0, one per class",
        doc="LabelSpreading's rbf gamma per class (the reference: 10 and 5)")
    alpha: Number = Float(1e-6, 0, 1, lo_open=True, hi_open=True, searchable=False,
                          doc="LabelSpreading's clamping (the reference: 1e-6, keep the answers)")
    keep_quantile: Number = Float(0.5, 0, 1, hi_open=True,
                                  doc="keep instances scored above this quantile (the "
                                      "reference: the median)")
    keep_scope: Literal["global", "per_class"] = Choice(
        "global", doc="global: the quantile of all scores (the reference); per_class: each "
                      "class cut at its own")
    curated_size: int = Int(120, 2, 10_000_000)
    k_max: int = Int(5, 2, 50, doc="elbow search over K in [2, k_max] on each space")
    cell_share: Literal["spread", "uniform"] = Choice("spread")
    curation: Literal["reference", "class_balanced"] = Choice(
        "reference", doc="reference: the notebook's cells over all kept images; "
                         "class_balanced: half the budget per class, cells within each")
    embedding: Literal["pca", "umap"] = Choice("umap", doc="umap: the reference's; pca: fast")
    embedding_scope: Literal["joint", "per_class"] = Choice(
        "joint", doc="joint: one embedding of the whole pool (the reference); per_class")
    annotator: Literal["simulated", "csv", "random"] = Choice(
        "simulated", searchable=False,
        doc="simulated: a stand-in person; csv: a person's answers; random: the ablation")
    annotations: str | None = Text(None, expected="the path of the annotation CSV")
    aiou_threshold: Number = Float(0.3, 0, 1)
    retrains: int = Int(10, 1, 1000, doc="last_layer: curations per grid point, one fit each, "
                                         "averaged (the reference tunes with 10)")
    c_grid: list[Number] = Floats(SLIM_C_GRID,
                                  expected="a non-empty list of distinct numbers > 0",
                                  doc="last_layer: inverse L1 strengths (the reference's 11)")
    class_weight_ratios: list[Number] = Floats(
        SLIM_CLASS_WEIGHTS, expected="a non-empty list of distinct numbers > 0",
        doc="last_layer: class weight ratios (the reference's 14, both ways)")

    @field_validator("gamma")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(not v > 0 for v in values):
            raise ValueError("needs numbers > 0")
        return values

    @field_validator("annotations")
    @classmethod
    def _from_the_sweep_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A relative path in the sweep file is relative to where it runs (pinned there)."""
        cwd = (info.context or {}).get("cwd")
        return str((Path(cwd) / Path(value).expanduser()).resolve()) if cwd and value else value


class SLIM(Method):
    #: The reference's full retraining (model_training.py) augments only with
    #: --basic_data_aug, off by default.
    reference_augments = False
    name = "slim"
    section = "slim"
    Params = SLIMParams
    summary = "GradCAM attention + a few annotations -> balanced curated subset -> retrain"
    deterministic_errors = (AnnotationError,)  # a bad annotation file stays bad on a retry
    commands: ClassVar[dict[str, str]] = {"annotate": "debias.slim.annotate:run_annotate"}

    # ------------------------------------------------------------------ sweep-time hooks

    @classmethod
    def bias_labels(cls, params: SLIMParams, dataset: str | None = None) -> BiasLabels:
        """A person's answers and random ones read no bias label; the simulated annotator
        stands in for a person with privileged information: the foreground masks where the
        dataset has them, else the training groups (majority bias value per class)."""
        if params.annotator != "simulated":
            return BiasLabels()
        from debias.data import has_masks

        source = "object masks" if dataset and has_masks(dataset) else "groups"
        return BiasLabels(stand_in=f"simulated annotator ({source})")

    @classmethod
    def trial_kind(cls, params: SLIMParams) -> str:
        return "last_layer" if params.retrain == "last_layer" else "epochs"

    @classmethod
    def shared_stages(cls, config: TrialConfig, data: Any) -> list[Any]:
        return stage_requests(config, cls.params_of(config), data)

    @classmethod
    def check(cls, ctx: SweepContext) -> None:
        slim = ctx.params
        assert isinstance(slim, SLIMParams)
        if "umap" in ctx.values_of("slim.embedding") and importlib.util.find_spec(
                "umap") is None:
            ctx.problems.append("slim.embedding: got 'umap'; expected 'pca' here, or install "
                                "umap-learn first (pip install umap-learn)")
        if slim.annotator != "csv":
            return
        if not slim.annotations:
            ctx.problems.append(
                "slim.annotations: missing; expected the path of the annotation CSV when "
                "slim.annotator is 'csv' (it is written for you to fill in if it does not "
                "exist)")
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
        sweep can take before trials start (see :func:`debias.slim.annotate.check_request`)."""
        if spec.params_of(cls.name).annotator == "csv":
            from debias.slim.annotate import check_request

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
        self.reference = reference_for(self.config, self.params, self.data, self.cache,
                                       self.device)
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
        return validation_halves(self.data, sampling_seed(self.config, self.params))

    def reference_seed(self) -> int:
        return sampling_seed(self.config, self.params)

    def fit_subsets(self, fit_half: np.ndarray) -> list[np.ndarray]:
        curations = [curation(self.config, self.params, self.data, self.cache, self.device,
                              self.reference, retrain_index=r, oracle=self.audit.oracle)
                     for r in range(self.params.retrains)]
        subsets = [np.sort(c["positions"].numpy()) for c in curations]
        assert all(np.isin(s, fit_half).all() for s in subsets), "curated outside the fit half"
        self.curations = curations
        self._subsets = subsets
        self._fit_report = self._report(curations[0], subsets[0])
        return subsets

    def final_subsets(self) -> list[np.ndarray]:
        """The reference refits its final head ``final_retrains`` times on its curated set,
        standardised with all of validation; here the curated sets are those of the fit half
        (one annotation round: the held-out half selects, the reference selects in-sample on
        group labels), taken in turn."""
        return [self._subsets[r % len(self._subsets)]
                for r in range(self.params.final_retrains)]

    def fit_report(self) -> dict[str, Any]:
        return self._fit_report
