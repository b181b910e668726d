"""The dry run's cost estimate against the measured wall clock of the same sweeps, in one run.

For each sweep: ``launch.py FILE --dry-run`` (its ``estimate:`` line: the seconds from a
training step timed on this machine, on this machine's slots), then ``launch.py FILE`` for
real in a fresh temp dir (its own storage and sqlite MLflow store), timed from start to exit.
Sweeps: the quickstart, the study of every method (``sweeps/compare_synthetic.yaml``), and a
real-data sweep on the embedded benchmark written in the Waterbirds layout at 224 px
(``sweeps/cfix_waterbirds.yaml`` with ResNet-18 from scratch, 2 epochs, 200 images: the
decoded cache and GradCAM-free ClusterFix stages at full size).

    python benchmarks/bench_estimate.py [--quick] [--no-study] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import command, machine, publish, stamp

REPO = Path(__file__).resolve().parents[1]


def _launch(args: list[str], tmp: Path, env: dict[str, str] | None = None
            ) -> tuple[str, float]:
    import os

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "launch.py", *args,
                             "--set", f"storage={tmp / 'results'}",
                             "--set", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"],
                            cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed: {result.stdout[-2000:]} {result.stderr[-2000:]}")
    return result.stdout, seconds


def measure(name: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="debias_estimate_") as tmp:
        out, dry_s = _launch([*args, "--dry-run"], Path(tmp), env)
        line = next(x for x in out.splitlines() if x.startswith("estimate:"))
        estimate = float(re.search(r"\((\d+) s\)", line).group(1))  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(prefix="debias_estimate_") as tmp:
        _, measured = _launch(args, Path(tmp), env)
    return {"name": name, "line": line, "estimate": estimate, "measured": measured,
            "dry_s": dry_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the quickstart only")
    p.add_argument("--no-study", action="store_true", help="skip the 8-minute study")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    start = time.perf_counter()
    rows = [measure("quickstart (`sweeps/quickstart.yaml`)", ["sweeps/quickstart.yaml"])]
    if not args.quick:
        from debias.data.export_layouts import write_dataset

        with tempfile.TemporaryDirectory(prefix="debias_estimate_data_") as data:
            write_dataset("waterbirds", data, images=200)
            rows.append(measure(
                "real-data ClusterFix (`sweeps/cfix_waterbirds.yaml` on 200 Waterbirds-layout "
                "images, ResNet-18 at 224 px, 2 epochs, 2 search trials, 1 seed)",
                ["sweeps/cfix_waterbirds.yaml", "--set", "targets=[Object]",
                 "--set", "bias_attribute=Place",
                 "--set", "backbone={arch: resnet18, weights: none}",
                 "--set", "train.epochs=2", "--set", "reference.epochs=2",
                 "--set", "search.num_samples=2", "--set", "seeds=[0]",
                 "--set", "resources={cpu: 1, gpu: 0}"], env={"DEBIAS_DATA": data}))
        if not args.no_study:
            rows.append(measure("study of six methods (`sweeps/compare_synthetic.yaml`)",
                                ["sweeps/compare_synthetic.yaml"]))
    table = ["| sweep | estimate (dry run) | measured (start to exit) | estimate / measured |",
             "|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['name']} | {r['estimate']:.0f} s | {r['measured']:.0f} s | "
                     f"**{r['estimate'] / r['measured']:.2f}** |")
    text = "\n".join([
        "### Estimate vs measured: what `--dry-run` says a sweep will take",
        "",
        f"`{command('benchmarks/bench_estimate.py')}`",
        "",
        f"Machine: {machine('CPU only')}. Date: {stamp()}. Whole run: "
        f"{time.perf_counter() - start:.0f} s.",
        "Each sweep's `--dry-run` (a training step of its model at its image size timed here, "
        "the work counted from the file and the data, on this machine's slots), then the same "
        "command for real in a fresh folder, timed from start to exit.",
        "",
        *table,
        "",
        "The estimate lines, as printed:",
        "",
        *[f"- {r['line']}" for r in rows],
        "",
        f"A dry run takes {max(r['dry_s'] for r in rows):.0f} s at most here (validation, the "
        "data, the timed step). What the estimate leaves out (debias/estimate.py): the input "
        "pipeline is assumed to keep up, an epoch visits the training split once (samplers "
        "that upweight or balance visit more or fewer), test is counted every epoch (in fact "
        "only when the selection improves) and ASHA's early stops are not predicted.",
        "",
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
