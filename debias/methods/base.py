"""The one interface every debiasing method implements, in one module per method.

A method is a class with, next to its code:

- ``Params``: its sweep-file section as a typed model (:mod:`debias.params`): defaults,
  bounds, which keys a search may vary; ``section`` names the section it owns;
- sweep-time hooks (class methods, called by the validator and the planner before anything
  runs): cross-key rules (:meth:`Method.check`), what a step is (:meth:`Method.steps`),
  what must exist before trials (:meth:`Method.preflight`), which bias labels it reads
  (:meth:`Method.bias_labels`), which kind of trial runs it (:meth:`Method.trial_kind`);
- trial-time hooks on an instance: the shared stages it prepares (cached, so trials reuse
  them), its model's heads, the order and weighting of its training data, the loss of a
  batch, and what it reports per epoch and per evaluation.

Everything else (seeding, data loading, evaluation, model selection, checkpoints, Ray, MLflow)
lives outside, so the engine and the trainable are handed a method and never branch on its
name. Methods never see the training split's bias labels unless :meth:`Method.bias_labels`
says they use them: the engine gives them a table with those labels hidden, and numbers that
*describe* the hidden labels (cluster purity, say) go through :class:`BiasAudit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from debias.cache import StageCache
from debias.data import GroupedDataset
from debias.linear_heads import split_halves
from debias.metrics import cluster_purity
from debias.models import Classifier
from debias.params import SearchDomain, Section
from debias.sections import Train
from debias.seeding import derive_seed
from debias.stage_plan import StageRequest
from debias.sweep_file import SweepFile
from debias.trial_config import Settings, TrialConfig

__all__ = ["BiasAudit", "BiasLabels", "Method", "NoParams", "PreflightError", "SweepContext"]


class PreflightError(RuntimeError):
    """What a method needs before its first trial is missing; the message says what to do."""


class NoParams(Section):
    """A method without knobs of its own."""


@dataclass(frozen=True)
class BiasLabels:
    """Which bias (group) labels a method reads, beyond evaluation and model selection.

    ``train``: the training split's (GroupDRO, SUBG/RWG: oracles). ``val``: validation's, to
    *fit* something (DFR fits its last layer on a group-balanced half of validation).
    Selection by a metric such as ``val/worst_group_acc`` also reads validation bias labels;
    the report says so from the metric, separately.
    """

    train: bool = False
    val: bool = False
    #: Bias information the method reads through a stand-in (a simulated annotator answering
    #: from the groups or from foreground masks): not visible to the method as labels, but
    #: privileged information all the same, so the report counts it as reading bias labels.
    stand_in: str = ""

    def describe(self) -> str:
        used = [name for name, on in (("train", self.train), ("val", self.val)) if on]
        if self.stand_in:
            used.append(self.stand_in)
        return "+".join(used) if used else "none"

    @property
    def reads_any(self) -> bool:
        return self.train or self.val or bool(self.stand_in)


@dataclass
class SweepContext:
    """What a method's sweep-time hooks see: the typed sweep file, the search domains that
    apply to the method, its own parameters, and where to report problems."""

    sweep: SweepFile
    space: tuple[SearchDomain, ...]
    params: Section
    problems: list[str] = field(default_factory=list)

    def values_of(self, path: str) -> set[Any]:
        """Every value a key can take in this sweep: its searched choices, else the file's."""
        for d in self.space:
            if d.path == path:
                return set(d.values) if d.kind == "choice" else {None}
        section, _, leaf = path.partition(".")
        return {getattr(getattr(self.sweep, section, None), leaf, None)}

    def epochs(self) -> str:
        """The epochs a trial trains, for the plan: the file's, or the searched ones."""
        for d in self.space:
            if d.path == "train.epochs":
                if d.kind == "choice":
                    return f"{' or '.join(str(v) for v in sorted(d.values))} epochs (searched)"
                return f"{int(d.low)} to {int(d.high)} epochs (searched)"
        return f"{self.sweep.train.epochs} epochs"

    def searched(self, prefix: str = "") -> list[str]:
        return [d.path for d in self.space if d.path.startswith(prefix)]


class BiasAudit:
    """Reporting-only access to the true bias labels of a split.

    A method that declares it uses no training bias labels is trained on a table where they
    are hidden; what it reports *about* the hidden labels (how pure its clusters are, which
    groups its curated subset holds) is computed here, never from labels it could train on.
    """

    def __init__(self, data: GroupedDataset) -> None:
        self._data = data

    def group_mix(self, split: str, positions: np.ndarray) -> dict[str, float]:
        """Counts per group ``{y}_{a}`` of ``positions`` of ``split``."""
        view = self._data.view(split)
        n_bias = self._data.n_bias
        groups = view.y[positions] * n_bias + view.a[positions]
        counts = np.bincount(groups, minlength=self._data.n_classes * n_bias)
        return {f"{g // n_bias}_{g % n_bias}": float(n) for g, n in enumerate(counts)}

    def purity(self, partition: np.ndarray, n_parts: int, split: str = "train"
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per part: size, and the share of its majority bias value (NaN where empty). A
        purity near 1 means the partition found the hidden bias attribute."""
        return cluster_purity(partition, self._data.view(split).a, n_parts)

    def oracle(self, split: str) -> np.ndarray:
        """The bias labels of a split, for a *simulated person* only (SLIM's group-based
        stand-in annotator, tagged as simulated): never for training a method."""
        return np.asarray(self._data.view(split).a)


class Method:
    """Base class: ERM's behaviour, overridden piecewise by other methods."""

    #: The registry name (``method: <name>`` in a sweep file).
    name: ClassVar[str]
    #: The sweep-file section holding ``Params`` (None: the method has no section).
    section: ClassVar[str | None] = None
    Params: ClassVar[type[Section]] = NoParams
    #: One line for ``--dry-run`` and the docs.
    summary: ClassVar[str] = ""
    #: Selection metrics this method adds to every method's (e.g. a worst pseudo-group
    #: accuracy, which needs no bias labels).
    extra_selection_metrics: ClassVar[tuple[str, ...]] = ()
    #: Whether the method's reference code augments training images (random resized crop and
    #: flip) by default; ``train.augment: auto`` follows it (docs/methods.md says per method).
    reference_augments: ClassVar[bool] = True
    #: Errors of this method that no retry can cure (a bad annotation file, say): a trial
    #: or stage task raising one ends at once with its cause instead of being retried.
    deterministic_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: Commands of ``launch.py SWEEP --<name>`` this method brings: name -> "module:function",
    #: called as ``function(spec, sweep, overrides, port) -> exit code`` (SLIM's
    #: ``annotate``: its human step). Named by string, so that the CLI imports the module
    #: only when the command runs.
    commands: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ sweep-time hooks

    @classmethod
    def figures(cls, target: Any, folder: Path) -> dict[str, tuple[Path, Any]]:
        """This method's own figures of one pipeline for ``--report``, drawn from MLflow:
        ``target`` is a :class:`debias.plots.TargetRuns` (its parent run's tags, finished
        search and seed runs), ``folder`` where to write PNGs; returns {file stem: (path,
        matplotlib Figure)}. None by default; ClusterFix draws its clusters' purity. Draw
        with :mod:`debias.plots`' helpers, imported inside (a trial never loads matplotlib)."""
        return {}

    @classmethod
    def params_of(cls, config: Settings) -> Section:
        """This method's typed parameters from a trial's settings or a resolved (already
        validated) sweep config."""
        if not cls.section:
            return cls.Params.model_validate({})
        own = (config.section(cls.section) if isinstance(config, TrialConfig)
               else config.get(cls.section))
        return cls.Params.model_validate(own or {})

    @classmethod
    def bias_labels(cls, params: Section, dataset: str | None = None) -> BiasLabels:
        """What the method reads of the bias attribute with ``params`` on ``dataset`` (a
        dataset name: whether it has foreground masks can matter)."""
        del params, dataset
        return BiasLabels()

    @classmethod
    def trial_kind(cls, params: Section) -> str:
        """``epochs`` (the shared SGD loop, :mod:`debias.engine`) or ``last_layer`` (a grid
        of logistic regressions on frozen features, :mod:`debias.last_layer`)."""
        del params
        return "epochs"

    @classmethod
    def augments(cls, train: Train) -> bool:
        """Whether this method's trials augment training images: ``train.augment``, where
        ``auto`` is the reference code's default (:attr:`reference_augments`)."""
        if train.augment == "auto":
            return cls.reference_augments
        return train.augment == "on"

    @classmethod
    def uses_train_knobs(cls, params: Section) -> bool:
        """Whether ``train.*`` changes anything (a last-layer fit has no SGD)."""
        return cls.trial_kind(params) == "epochs"

    @classmethod
    def shared_stages(cls, config: TrialConfig, data: GroupedDataset) -> list[StageRequest]:
        """The shared stages a trial of ``config`` reads, for the sweep's planner to compute
        once, as Ray tasks, before it starts (cheap per-trial stages may stay in the trial)."""
        del config, data
        return []

    @classmethod
    def check(cls, ctx: SweepContext) -> None:
        """Rules between this method's knobs and the rest of the file; append to
        ``ctx.problems`` (single keys are already checked by ``Params``)."""

    @classmethod
    def steps(cls, ctx: SweepContext) -> str:
        """What one reported step of a trial is, for the plan printed by ``--dry-run``."""
        return ctx.epochs()

    @classmethod
    def preflight(cls, spec: Any, dry_run: bool) -> None:
        """Work that must exist before any trial starts (SLIM: a person's answers); ``spec``
        is the validated :class:`debias.spec.Spec`. Raise :class:`PreflightError` with what
        to do next."""
        del spec, dry_run

    @classmethod
    def report_notes(cls, params: Section) -> list[str]:
        """Caveats the report prints beside this method's rows."""
        del params
        return []

    # ------------------------------------------------------------------ trial-time hooks

    def __init__(self, config: Settings, data: GroupedDataset,
                 cache: StageCache, device: torch.device, audit: BiasAudit | None = None
                 ) -> None:
        self.config = TrialConfig.of(config)
        self.params = self.params_of(self.config)
        self.seed = self.config.seed
        self.data = data
        self.cache = cache
        self.device = device
        self.audit = audit or BiasAudit(data)

    def prepare(self) -> None:
        """Compute or fetch the shared stages this method needs (no-op for ERM)."""

    def heads(self) -> dict[str, int]:
        return {"target": self.data.n_classes}

    def setup_model(self, model: Classifier) -> None:
        """Adjust a freshly built model before its optimiser exists (e.g. load and freeze a
        trunk); parameters left with requires_grad=False are not optimised."""
        del model

    def train_positions(self) -> np.ndarray:
        """Positions of the training split this trial draws from (SLIM narrows it)."""
        return np.arange(len(self.data.view("train")))

    def epoch_order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """The positions of one epoch, in order (default: a permutation of
        :meth:`train_positions`). Samplers that reweight return draws with replacement."""
        del epoch
        return rng.permutation(self.train_positions())

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(images), labels)

    def epoch_metrics(self) -> dict[str, Any]:
        """Method-specific numbers for this epoch, named `{method}/...`."""
        return {}

    def eval_metrics(self, split: str, preds: np.ndarray) -> dict[str, float]:
        """Extra metrics of a split's predictions, named `{split}/...` (none for ERM)."""
        del split, preds
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-trial state that must survive a retry (tensors and plain Python only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    # ------------------------------------------------------------------ last-layer trials

    def fit_halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Last-layer methods: (fit, held-out) positions of validation, a random half of each
        class each, drawn from the trial's seed (reported seeds re-draw them)."""
        return split_halves(self.data.view("val").y, derive_seed(self.seed, "val-halves"))

    def reference_seed(self) -> int:
        """The seed of the reference model whose features a last-layer trial fits on."""
        return self.seed

    def fit_subsets(self, fit_half: np.ndarray) -> list[np.ndarray]:
        """Last-layer methods: the validation positions (within ``fit_half``) each tuning
        retrain fits on; the last-layer trial averages one fit per array."""
        raise NotImplementedError(f"{self.name} runs no last-layer trial")

    def final_subsets(self) -> list[np.ndarray]:
        """Last-layer methods: the validation positions (of the whole split) each fit of the
        final head is fitted on (``final_fit: all_val``); the trial averages them."""
        raise NotImplementedError(f"{self.name} runs no last-layer trial")

    def fit_report(self) -> dict[str, Any]:
        """Last-layer methods: once-per-trial numbers about what was fitted."""
        return {}
