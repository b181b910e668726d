"""What a process imports before it does any work. A Tune worker imports the trainable, and
every sweep validates its file, once per process: a library imported there at module level
(torchvision pulls in torch._dynamo, scikit-learn scipy, grad-cam OpenCV; MLflow is ~1 s) is
paid by every trial worker and every command (BENCHMARKS.md, "Sweep efficiency"). Checked in
a fresh interpreter, by the modules it ends up holding, not by timing."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torchvision", "sklearn", "scipy", "mlflow", "pytorch_grad_cam", "cv2", "matplotlib",
         "optuna")


def _loaded_after(code: str) -> set[str]:
    probe = (f"import sys, json\n{code}\n"
             f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_trial_worker_imports_no_library_it_may_not_use() -> None:
    assert _loaded_after("import debias.trainable") == set()


def test_validating_a_sweep_file_imports_no_method_library() -> None:
    """Every method's parameters are read to validate a study (SLIM's and ClusterFix's
    included), without importing what those methods run on."""
    loaded = _loaded_after("from debias.spec import load_spec\n"
                           "load_spec('sweeps/quickstart.yaml')\n"
                           "load_spec('sweeps/compare_synthetic.yaml')")
    assert loaded == set()
