"""The models a sweep selected, out of MLflow and back into use.

Every trial logs the model its validation metric selected (``model/state_dict.pt``, loadable
with ``torch.load(weights_only=True)``) and everything needed to rebuild it
(``model/config.yaml``, the trial's resolved config). ``launch.py SWEEP --export DIR`` writes,
per pipeline, the best config's model for every reported seed with its logged metrics;
:func:`load_model` and :func:`evaluate` rebuild one and score a split the way the trial did
(the same evaluation loop and batches, so on a CPU the same numbers).

A last-layer trial's model is the reference trunk with the fitted head as its ``target``
head, applied to the trunk's raw features in float64, exactly as it was fitted and scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from debias.data import GroupedDataset, make_torch_dataset
from debias.engine import predict_classes
from debias.methods import resolve_method
from debias.metrics import group_metrics
from debias.models import Classifier, build_classifier
from debias.tracking import Tracker
from debias.trial_config import TrialConfig

__all__ = ["ExportedModel", "evaluate", "export_sweep", "load_model"]

MODEL_DIR = "model"


@dataclass
class ExportedModel:
    model: Classifier
    config: dict[str, Any]
    last_layer: bool


def load_model(folder: str | Path, device: str = "cpu") -> ExportedModel:
    """Rebuild a logged model from ``state_dict.pt`` + ``config.yaml`` in ``folder``."""
    folder = Path(folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    state = torch.load(folder / "state_dict.pt", map_location=device, weights_only=True)
    heads = {k.split(".")[1]: int(v.shape[0]) for k, v in state.items()
             if k.startswith("heads.") and k.endswith(".weight")}
    settings = TrialConfig.of(config)
    model = build_classifier(settings.backbone.arch, "none", heads)
    method = resolve_method(settings.method)
    last_layer = method.trial_kind(method.params_of(settings)) == "last_layer"
    if last_layer:  # the head stays float64, as it was fitted
        head = {k: state.pop(k) for k in list(state) if k.startswith("heads.target.")}
        model.load_state_dict({**model.state_dict(), **state})
        model.heads["target"] = model.heads["target"].double()
        model.heads["target"].load_state_dict({k.rsplit(".", 1)[1]: v for k, v in head.items()})
    else:
        model.load_state_dict(state)
    return ExportedModel(model.to(device).eval(), config, last_layer)


@torch.no_grad()
def evaluate(exported: ExportedModel, split: str = "test", device: str = "cpu",
             data: GroupedDataset | None = None) -> dict[str, float]:
    """The group metrics of ``split`` as the trial logged them (``{split}/...``)."""
    config = TrialConfig.of(exported.config)
    data = data or config.load_data()
    dev = torch.device(device)
    if exported.last_layer:
        from debias.stages import extract_features

        # The head was fitted on the trunk's raw features (debias/last_layer.py).
        feats = extract_features(exported.model, data, split, dev).numpy()
        head = exported.model.heads["target"]
        logits = feats.astype(np.float64) @ head.weight.cpu().numpy().T + head.bias.cpu().numpy()
        preds = logits.argmax(axis=1)
    else:
        dataset = make_torch_dataset(data, split, train=False,
                                     cache_dir=config.decoded_dir)
        preds = predict_classes(exported.model, dataset, config.train.eval_batch_size,
                                dev, config.train.num_workers)
    view = data.view(split)
    return group_metrics(preds, view.y, view.a, n_classes=data.n_classes, n_bias=data.n_bias,
                         train_group_mix=data.group_counts("train")).as_flat(split)


def export_sweep(tracker: Tracker, folder: Path) -> list[Path]:
    """Per pipeline, the best config's model of every reported seed, with its metrics:
    ``folder/<pipeline>/seed_<s>/{state_dict.pt, config.yaml, metrics.json}``.

    Each model is downloaded to a staging folder and checked to load (``torch.load`` with
    ``weights_only=True``, its config as YAML) before it is put in place; one that does not
    (a truncated upload) is named and skipped, never written."""
    import shutil
    import tempfile

    written = []
    for name, parent in sorted(tracker.parent_runs().items()):
        for run in tracker.child_runs(parent.info.run_id, "seeds"):
            if run.info.status != "FINISHED":
                continue
            seed = run.data.tags.get("seed", "?")
            out = folder / name.replace("/", "__") / f"seed_{seed}"
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as staging:
                try:
                    tracker.client.download_artifacts(run.info.run_id, MODEL_DIR, staging)
                except Exception as exc:  # a run from before models were logged
                    print(f"note: {name} seed {seed}: no logged model ({exc})")
                    continue
                model = Path(staging) / MODEL_DIR
                problem = _check_model(model)
                if problem:
                    print(f"note: {name} seed {seed}: the logged model is not exported: "
                          f"{problem} (run {run.info.run_id})")
                    continue
                out.mkdir(parents=True, exist_ok=True)
                for file in model.iterdir():
                    shutil.move(str(file), out / file.name)
            metrics = {k: v for k, v in run.data.metrics.items()
                       if k.startswith(("test/", "selected/"))}
            (out / "metrics.json").write_text(json.dumps(
                {"pipeline": name, "seed": seed, "run_id": run.info.run_id,
                 "metrics": metrics}, indent=1, sort_keys=True) + "\n")
            written.append(out)
    return written


def _check_model(folder: Path) -> str | None:
    """Why the model in ``folder`` cannot be used (None: it loads, weights only)."""
    weights, config = folder / "state_dict.pt", folder / "config.yaml"
    if not weights.is_file() or not config.is_file():
        return "state_dict.pt or config.yaml is missing"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        return f"state_dict.pt does not load with weights_only=True ({type(exc).__name__})"
    if not isinstance(state, dict) or not state:
        return "state_dict.pt holds no state_dict"
    try:
        if not isinstance(yaml.safe_load(config.read_text()), dict):
            return "config.yaml holds no mapping"
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return f"config.yaml does not parse ({type(exc).__name__})"
    return None
