"""Start-up cost a sweep pays per process: a Tune worker importing the trainable, and a command
validating its sweep file. Each is timed in fresh interpreters, side by side with the same
import plus the libraries it does not load at import time (torchvision, scikit-learn, scipy,
MLflow, grad-cam): the cost every trial worker and every command paid while those were
imported at module level (tests/test_startup.py keeps them out).

    python benchmarks/bench_startup.py [--rounds 5] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_common import command, machine, publish, stamp

REPO = Path(__file__).resolve().parents[1]
EAGER = "import torchvision, sklearn.cluster, sklearn.linear_model, scipy.special, mlflow, " \
        "pytorch_grad_cam"
CASES = {
    "a Tune worker imports the trainable (Ray and Tune already loaded)":
        ("import ray, ray.tune", "import debias.trainable"),
    "a command validates the quickstart study (`load_spec`)":
        ("import debias.cli", "from debias.spec import load_spec\n"
                              "load_spec('sweeps/quickstart.yaml')"),
}


def _timed(setup: str, code: str) -> float:
    """Seconds ``code`` takes in a fresh interpreter after ``setup`` (not timed)."""
    probe = (f"{setup}\nimport time\nt = time.perf_counter()\n{code}\n"
             "import json\nprint(json.dumps(time.perf_counter() - t))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 rounds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rounds = 2 if args.quick else args.rounds
    rows = []
    for label, (setup, code) in CASES.items():
        lazy, eager = [], []
        for _ in range(rounds):  # interleaved, so a busy moment hits both alike
            lazy.append(_timed(setup, code))
            eager.append(_timed(setup, f"{code}\n{EAGER}"))
        a, b = statistics.median(lazy), statistics.median(eager)
        rows.append(f"| {label} | {a:.2f} | {b:.2f} | **{a / b:.2f}** |")
    publish("\n".join([
        "### Start-up: what a trial worker and a command import",
        "",
        f"`{command('benchmarks/bench_startup.py')}`",
        "",
        f"Machine: {machine()}. Date: {stamp()}. Median of {rounds} fresh interpreters each, "
        "the two columns interleaved.",
        "",
        "| seconds | as shipped (heavy libraries imported where they are used) | the same "
        "plus torchvision, scikit-learn, scipy, MLflow, grad-cam (what module-level imports "
        "cost) | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
    ]), args.out)


if __name__ == "__main__":
    main()
