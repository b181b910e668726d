"""The real-data path rehearsed: every shipped Waterbirds and CelebA sweep file runs end to
end on the embedded benchmark written to disk in the published layouts (Waterbirds, CelebA's
Kaggle CSVs and its official text files) by ``launch.py --write-dataset``, at 224 px with
ResNet-18, through the command's entry point (``launch.py``'s ``main``, in the test's
process on the suite's local Ray): JPEG decoding, the decoded cache, the batched input
pipeline, stage tasks, GradCAM at full size, last-layer features, the report. Only budget
overrides (and what offline CI needs: no ImageNet download, no GPU):

- ``backbone.weights: none`` (ImageNet weights would be downloaded), ``arch: resnet18``;
- one epoch (train, reference model, JTT's identification model), one search trial (a
  searched grid cut to one value), one seed, one target; the knobs that set how many
  images a trial trains or fits on cut: JTT's ``lambda_up`` 2 (an epoch visits its error
  set lambda_up more times), SLIM's ``curated_size`` 16 (it asks for up to 5,000 of 24);
  SLIM's embedding PCA (UMAP's first call compiles for a minute) and its searched retrain
  mode cut to the file's own (full; its last-layer trial costs ~40 s here whatever the
  data, and DFR rehearses last-layer retraining on frozen features); batches of 8 where
  ClusterFix's CelebA sampler draws N // B batches an epoch (none of 24 images at B = 256);
- ``resources: {cpu: 1, gpu: 0}`` (this machine has no GPU), ASHA off (one epoch);
- SLIM's person (``annotator: csv``) replaced by its simulated annotator.

Lean on purpose (the suite's budget): 40 images per dataset (80 for DFR, which fits on
group-balanced draws from half of validation), the suite's local Ray shared by every sweep;
the test prints how long each sweep took.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

IMAGES = 40
#: DFR fits on group-balanced draws from half of validation: 4 images per group there.
DFR_IMAGES = 80
#: The shipped real-data sweep files and the layout each reads (both CelebA layouts used).
SWEEPS: dict[str, str] = {
    "cfix_waterbirds": "waterbirds", "dfr_waterbirds": "waterbirds-dfr",
    "groupdro_waterbirds": "waterbirds", "jtt_waterbirds": "waterbirds",
    "slim_waterbirds": "waterbirds", "cfix_celeba": "celeba",
    "jtt_celeba": "celeba-official", "slim_celeba": "celeba-official",
}
#: Stages each method must have computed as stage tasks (the real path's shared work).
STAGES: dict[str, set[str]] = {"cfix": {"reference", "features"},
                               "dfr": {"reference", "features"}, "groupdro": set(),
                               "jtt": {"jtt_errors"}, "slim": {"reference", "gradcam"}}


def _overrides(stem: str, tmp: Path) -> list[str]:
    """Budget overrides for one shipped file (read from the file, so they follow it)."""
    raw = yaml.safe_load((REPO / "sweeps" / f"{stem}.yaml").read_text())
    target = raw["targets"][0]
    bias = raw["bias_attribute"]
    bias = bias[target] if isinstance(bias, dict) else bias
    sets = [f"name=reh_{stem}", f"storage={tmp / 'results' / stem}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow' / stem}.db",
            f"targets=[{target}]", f"bias_attribute={bias}",
            "backbone={arch: resnet18, weights: none}", "train.epochs=1",
            "reference.epochs=1", "search.num_samples=1", "seeds=[0]",
            "resources={cpu: 1, gpu: 0}", "scheduler=null",
            f"cache.local_dir={tmp / 'local-cache'}"]
    section = raw.get(raw["method"]) or {}
    if "epochs_id" in section:
        sets.append(f"{raw['method']}.epochs_id=1")
    # Knobs that set how many images a trial trains or fits on, cut (searched or not):
    # JTT's lambda_up (an epoch visits the error set lambda_up more times), SLIM's curated
    # subset (it asks for up to 5,000 images of a 24-image pool).
    small = {"lambda_up": 2, "curated_size": 16}
    sets += [f"{raw['method']}.{k}={v}" for k, v in small.items() if k in section]
    space = (raw.get("search") or {}).get("space") or {}
    cut = {k: ({"choice": [v["choice"][0]]} if raw["search"].get("algorithm") == "grid"
               else v) for k, v in space.items()}  # a grid: one point of it
    cut = {k: ({"choice": [small[k.split(".")[-1]]]} if k.split(".")[-1] in small else v)
           for k, v in cut.items()}
    if "slim.retrain" in cut:  # the file's own mode (DFR rehearses last-layer retraining)
        cut["slim.retrain"] = {"choice": [section["retrain"]]}
    if cut != space:
        sets.append(f"search.space={json.dumps(cut)}")
    if raw["method"] == "slim":
        sets.append("slim.embedding=pca")  # UMAP's first call compiles (numba) for a minute
        if section.get("annotator") == "csv":
            sets.append("slim.annotator=simulated")
    if section.get("class_mix") is not None:  # N // B batches an epoch: B below N
        sets.append("train.batch_size=8")
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One dataset per layout (DEBIAS_DATA folders), written once by the real command."""
    tmp = tmp_path_factory.mktemp("rehearsal")
    out = {}
    for layout, images in (("waterbirds", IMAGES), ("celeba", IMAGES),
                           ("celeba-official", IMAGES), ("waterbirds-dfr", DFR_IMAGES)):
        folder = tmp / f"data-{layout}"
        result = subprocess.run(
            [sys.executable, "launch.py", "--write-dataset", layout.removesuffix("-dfr"),
             str(folder), "--images", str(images)], cwd=REPO, capture_output=True,
            text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "wrote" in result.stdout
        out[layout] = folder
    out["tmp"] = tmp
    return out


def test_every_shipped_real_data_sweep_runs_end_to_end(
        ray_local, written, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The command each sweep file's user runs (`launch.py FILE --set ...`), in this process
    on the suite's local Ray (no Ray to start per sweep), one sweep after another."""
    from debias.cli import main

    tmp = written["tmp"]
    (tmp / "mlflow").mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    start = time.monotonic()
    try:
        for stem, layout in SWEEPS.items():
            monkeypatch.setenv("DEBIAS_DATA", str(written[layout]))
            began = time.monotonic()
            code = main([str(REPO / "sweeps" / f"{stem}.yaml"), *_overrides(stem, tmp)])
            timings[stem] = time.monotonic() - began
            out, err = capsys.readouterr()
            assert code == 0, (stem, out[-3000:], err[-3000:])
            _check(stem, tmp, out)
    finally:
        with capsys.disabled():
            print(f"\nrehearsal: {len(timings)} sweeps in {time.monotonic() - start:.0f} s ("
                  + ", ".join(f"{stem} {seconds:.0f} s" for stem, seconds in timings.items())
                  + ")")


def _check(stem: str, tmp: Path, stdout: str) -> None:
    """What a real-data run must leave: a report row, finished runs with the pipeline's
    per-epoch numbers, the decoded cache, and the stage tasks of its method."""
    from mlflow.tracking import MlflowClient

    storage = tmp / "results" / stem
    assert "Results of sweep" in stdout, (stem, stdout[-2000:])
    with (storage / f"reh_{stem}" / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1, (stem, rows)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow' / stem}.db")
    experiment = client.get_experiment_by_name(f"reh_{stem}")
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    assert {r.data.tags["phase"] for r in runs} == {"search", "seeds"}, stem
    assert all(r.info.status == "FINISHED" for r in runs), stem
    method = stem.split("_")[0]
    # Trials that train by epochs log the pipeline's numbers (DFR's, and SLIM's last-layer
    # retraining, are grids over frozen features: no training batches).
    for r in runs:
        if method in ("cfix", "groupdro", "jtt") or (
                method == "slim" and r.data.params.get("slim.retrain") == "full"):
            assert r.data.metrics["perf/train_images_per_s"] > 0, stem
            assert 0 <= r.data.metrics["perf/data_wait_frac"] <= 1, stem
    decoded = list((storage / "cache" / "decoded").glob("*.npy")) + list(
        (tmp / "local-cache" / "decoded").glob("*.npy"))
    assert decoded, f"{stem}: no decoded cache was built"
    tasks = storage / "cache" / "stage_tasks.jsonl"
    done = ({json.loads(line)["stage"] for line in tasks.read_text().splitlines()}
            if tasks.exists() else set())
    assert STAGES[method] <= done, (stem, done)
