"""The training loop every method shares: seeding, data order, evaluation, model selection.

Reproducibility is designed in rather than hoped for: every random stream (weight init, data
order, augmentation, dropout) is derived from (trial seed, purpose, epoch), never from global
state left over by an earlier trial in the same process. So a trial resumed from its epoch-5
checkpoint sees exactly the batches an uninterrupted run would have seen, and two runs of the
same config and seed on a CPU produce identical metrics. (On a GPU, cuDNN's non-deterministic
kernels, e.g. some convolution backward passes and atomics-based reductions, can still make
the last digits differ.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from debias.cache import CorruptFile, StageCache
from debias.data import GroupedDataset, SplitView
from debias.data.pipeline import InputPipeline, loader_workers
from debias.methods.base import BiasAudit, Method
from debias.metrics import GroupMetrics, group_metrics
from debias.models import Classifier, build_classifier
from debias.seeding import derive_seed, seed_everything
from debias.trial_config import Settings, TrialConfig

__all__ = ["STARVED_WAIT_FRAC", "Selection", "Trainer", "method_for", "predict_classes",
           "trial_device"]

#: A trial that spends more than this share of its training time waiting for batches is
#: starved: its device idles on the input pipeline (the live view and the report flag it).
STARVED_WAIT_FRAC = 1.0 / 3.0


@dataclass
class Selection:
    """Best epoch so far by the validation selection metric, with its test metrics."""

    metric: str
    mode: str
    score: float | None = None
    epoch: int | None = None
    test: dict[str, float] = field(default_factory=dict)

    def improves(self, value: float) -> bool:
        if self.score is None or math.isnan(self.score):
            return not math.isnan(value)
        return value > self.score if self.mode == "max" else value < self.score

    def record(self, metrics: dict[str, float], epoch: int,
               evaluate_test: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Take this epoch's validation metrics; test is evaluated only when it is the best
        so far. Returns the selection's report: score, epoch and the selected test metrics."""
        score = metrics.get(self.metric, float("nan"))
        if self.improves(score):
            self.score, self.epoch = score, epoch
            self.test = evaluate_test()
        return {"selected/score": self.score if self.score is not None else float("nan"),
                "selected/epoch": self.epoch or 0, **self.test}

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "epoch": self.epoch, "test": dict(self.test)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.epoch, self.test = state["score"], state["epoch"], dict(state["test"])


@torch.no_grad()
def predict_classes(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
                    device: torch.device, num_workers: int | str = 0,
                    memory_format: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """Predicted classes of a dataset of (image, position) items, in position order: the one
    evaluation loop, for trials, stages and exported models alike (same batches, so the same
    numbers on a CPU)."""
    model.eval()
    if not isinstance(num_workers, int):  # train.num_workers: auto, outside a trial
        num_workers = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds = np.empty(len(dataset), dtype=np.int64)  # type: ignore[arg-type]
    for images, positions in loader:
        logits = model(images.to(device, non_blocking=True, memory_format=memory_format))
        preds[positions.numpy()] = logits.argmax(1).cpu().numpy()
    return preds


def trial_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def method_for(method: type[Method], config: TrialConfig, data: GroupedDataset,
               cache: StageCache, device: torch.device) -> Method:
    """The method of a trial, on a table that hides the training split's bias labels unless
    the method declares it uses them; what it reports about them goes through the audit."""
    uses = method.bias_labels(method.params_of(config))
    seen = data if uses.train else data.without_bias("train")
    return method(config, seen, cache, device, BiasAudit(data))


class Trainer:
    """One trial: builds data, method and model from a resolved trial config, then yields the
    metrics of each epoch. Checkpoints are plain state_dicts (loadable with weights_only)."""

    def __init__(self, config: Settings, method: type[Method],
                 device: str | None = None, data: GroupedDataset | None = None) -> None:
        self.config = config = TrialConfig.of(config)
        self.seed = config.seed
        self.train_cfg = t = config.train
        self.device = trial_device(device)
        self.data: GroupedDataset = data or config.load_data()
        self.cache = StageCache(config.cache_dir)
        self.method = method_for(method, config, self.data, self.cache, self.device)
        before = StageCache.events()
        self.method.prepare()
        # What this trial computed vs reused of the shared stages, reported with every epoch.
        self.cache_events = {k: float(v - before.get(k, 0))
                             for k, v in StageCache.events().items()}
        # Strings, not metrics: tagged on the MLflow run as stage/<name> = cache key.
        self.stage_tags = self.cache.stage_tags()

        seed_everything(derive_seed(self.seed, "init"))
        self.model: Classifier = build_classifier(
            config.backbone.arch, config.backbone.weights, self.method.heads()).to(self.device)
        self.method.setup_model(self.model)
        self.memory_format = (torch.channels_last if t.channels_last
                              else torch.contiguous_format)
        self.model = self.model.to(memory_format=self.memory_format)
        # bf16 autocast where the hardware has it (CUDA); a no-op context on the CPU path.
        self.amp = t.amp and self.device.type == "cuda"
        self.step_model = torch.compile(self.model) if t.compile else self.model
        self.optimizer = self._optimizer()
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=t.epochs) if t.scheduler == "cosine" else None)
        self.selection = Selection(metric=config.selection.metric, mode=config.selection.mode)
        self.epoch = 0  # epochs completed
        self.selected_state: dict[str, torch.Tensor] | None = None
        # The training split's group mix weighs `weighted_acc`; a table that hides the
        # training bias labels (a stage trained inside a method) reports without it.
        self.train_mix = (None if "train" in self.data.hidden_bias
                          else self.data.group_counts("train"))

        # The input pipeline: on-disk datasets are decoded once per node into a shared
        # memory-mapped array (debias/data/decoded.py) and served as uint8 batches, cropped
        # and normalised on the trial's device (debias/data/pipeline.py); in-memory ones
        # (synthetic) are sliced. Augmentation follows the method's reference code unless
        # train.augment says otherwise. Workers follow the CPUs the trial holds (the
        # trainable sets torch's threads to them) unless train.num_workers is a number.
        self.pipeline = InputPipeline(
            self.data, cache_dir=config.decoded_dir, device=self.device,
            augment=method.augments(t), seed=self.seed,
            workers=loader_workers(t.num_workers, self.device, torch.get_num_threads(),
                                   in_memory=self.data.images is not None),
            memory_format=self.memory_format)
        self.train_labels = torch.tensor(self.data.view("train").y, device=self.device)

    @property
    def train_set(self) -> SplitView:
        """The training split (its length is the epoch's size before the method's sampler)."""
        return self.data.view("train")

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.train_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum,
                                   weight_decay=t.weight_decay)
        cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "method": self.method.state_dict(),
            "selection": self.selection.state_dict(),
            "selected_model": self.selected_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.selection.load_state_dict(state["selection"])
        self.selected_state = state.get("selected_model")

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise CorruptFile(f"checkpoint {path} does not load ({type(exc).__name__}: "
                              f"{exc}); delete the trial's folder to start it afresh") from exc
        self.load_state_dict(state)

    # ------------------------------------------------------------------ the loop

    def epochs(self) -> Iterator[dict[str, float]]:
        """Train the remaining epochs, yielding each epoch's metrics after it completes."""
        while self.epoch < self.train_cfg.epochs:
            metrics = self.train_one_epoch()
            yield metrics

    def train_one_epoch(self) -> dict[str, float]:
        epoch = self.epoch
        seed_everything(derive_seed(self.seed, "epoch", epoch))
        # The method decides which positions an epoch visits (a subset, draws with
        # replacement for reweighting samplers); the order is a stream of its own, and each
        # batch's augmentation one more (the pipeline derives it from seed, epoch, batch).
        rng = np.random.default_rng(derive_seed(self.seed, "order", epoch))
        order = self.method.epoch_order(epoch, rng)
        self.model.train()
        total, count = 0.0, 0
        self.pipeline.wait_s = 0.0
        start = time.perf_counter()
        for images, positions in self.pipeline.epoch(order, self.train_cfg.batch_size,
                                                     epoch):
            labels = self.train_labels[positions.to(self.device, non_blocking=True)]
            with self._autocast():
                loss = self.method.loss(self.step_model, images, positions, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            # Reading the loss waits for the step: the time to the next batch is then time
            # the device idles for data, which is what perf/data_wait_frac measures.
            total += float(loss.detach()) * len(positions)
            count += len(positions)
        elapsed = max(time.perf_counter() - start, 1e-9)
        if self.scheduler:
            self.scheduler.step()
        self.epoch = epoch + 1

        metrics: dict[str, float] = {"epoch": self.epoch, "train/loss": total / max(count, 1),
                                     "perf/train_images_per_s": count / elapsed,
                                     "perf/data_wait_frac": self.pipeline.wait_s / elapsed}
        metrics.update(self.method.epoch_metrics())
        metrics.update(self.cache_events)
        metrics.update(self.stage_tags)
        metrics.update(self.evaluate("val"))
        metrics.update(self.selection.record(metrics, self.epoch, self._select))
        if self.epoch >= self.train_cfg.epochs:
            self.pipeline.close()  # the workers' memory back as soon as training ends
        return metrics

    def _select(self) -> dict[str, float]:
        """This epoch is the best so far: keep its weights and score its test split."""
        self.selected_state = {k: v.detach().cpu().clone()
                               for k, v in self.model.state_dict().items()}
        return self.evaluate("test")

    def selected_model(self) -> dict[str, Any] | None:
        """The weights of the epoch the validation metric selected (None before one was)."""
        return self.selected_state

    @torch.no_grad()
    def predict(self, split: str) -> np.ndarray:
        """Predicted classes of a split, in position order, through the trial's pipeline."""
        self.step_model.eval()
        preds = np.empty(len(self.data.view(split)), dtype=np.int64)
        with self._autocast():
            for images, positions in self.pipeline.split(split,
                                                         self.train_cfg.eval_batch_size):
                preds[positions.numpy()] = self.step_model(images).argmax(1).cpu().numpy()
        return preds

    def group_metrics(self, split: str, preds: np.ndarray) -> GroupMetrics:
        view = self.data.view(split)
        return group_metrics(preds, view.y, view.a, n_classes=self.data.n_classes,
                             n_bias=self.data.n_bias, train_group_mix=self.train_mix)

    def evaluate(self, split: str) -> dict[str, float]:
        """Group metrics of a split plus the method's own (e.g. worst pseudo-group accuracy),
        flat and prefixed with the split name."""
        preds = self.predict(split)
        out = self.group_metrics(split, preds).as_flat(split)
        out.update(self.method.eval_metrics(split, preds))
        return out
