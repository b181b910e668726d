"""`launch.py SWEEP --annotate`: SLIM's human step, from request to the command that uses it.

The page works on the annotation request CSV (``slim.annotations``). If it does not exist
yet it is built first by the code path a SLIM trial uses (:class:`debias.methods.slim.SLIM`'s
``prepare``: the cached ERM reference model, the cached GradCAM attention, the same sampling),
which writes the request and its overlay PNGs and stops with an AnnotationError. Then the
page (:mod:`debias.slim.annotation_page`, saving through
:class:`debias.slim.annotation_store.AnnotationStore`) is served on 127.0.0.1 until Ctrl-C;
a second ``--annotate`` on the same CSV is refused with the first one's URL. When every
image is answered it prints the command that runs the sweep with the answers: the same
sweep file and every ``--set`` given, plus the annotation file's path.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from debias.sections import Resources
from debias.slim.annotation_page import start_annotation_server, stop_annotation_server
from debias.slim.annotation_store import AnnotationStore
from debias.slim.annotations import (
    AnnotationError,
    read_request_rows,
    request_splits,
    write_annotation_request,
)
from debias.spec import Spec
from debias.trial_config import TrialConfig
from debias.ui import HOST, free_port, stop_signals_as_interrupt

__all__ = ["DEFAULT_PORT", "annotate_command", "check_request", "ensure_request",
           "missing_request_splits", "run_annotate", "sweep_command"]

DEFAULT_PORT = 8765


def _knobs(spec: Spec) -> Any:
    """The sweep's SLIM parameters, typed (:class:`debias.methods.slim.SLIMParams`)."""
    return spec.params_of("slim")


def _needed_splits(spec: Spec) -> dict[str, str]:
    """{split: retrain mode} for every retrain mode the sweep can take."""
    from debias.slim.modes import MODE_SPLITS

    return {MODE_SPLITS[mode]: mode
            for mode in sorted(spec.values_of("slim.retrain", "slim"))}


def missing_request_splits(spec: Spec) -> list[str]:
    """Splits the sweep needs answers for that the annotation file has no rows of (all of
    them while the file does not exist). Reads the CSV only: cheap enough for a dry run."""
    path = Path(_knobs(spec).annotations)
    have = request_splits(path) if path.is_file() else set()
    return [split for split in _needed_splits(spec) if split not in have]


def ensure_request(spec: Spec) -> tuple[Path, int]:
    """(the sweep's request CSV, how many rows were just written to it). Rows are built for
    the first target and for every retrain mode the sweep can take whose split the file
    lacks (each row names its split): a missing file is created, and a file from a sweep
    that has since added a mode gets that mode's rows, the answers already in it kept."""
    if "slim" not in spec.methods:
        raise AnnotationError(f"--annotate is SLIM's annotation step; sweep {spec.name!r} "
                              f"uses method {spec.method!r}")
    slim = _knobs(spec)
    if slim.annotator != "csv" or not slim.annotations:
        raise AnnotationError(
            f"sweep {spec.name!r} has slim.annotator {slim.annotator!r}; annotating by "
            "hand needs --set slim.annotator=csv --set slim.annotations=PATH.csv")
    if len(spec.targets) > 1:
        print(f"note: slim.annotations is one file but the sweep has {len(spec.targets)} "
              f"targets; the request is for the first, {spec.targets[0]!r} (annotate the others "
              "with --set targets=[T] --set slim.annotations=OTHER.csv)", file=sys.stderr)
    path = Path(slim.annotations)
    missing = missing_request_splits(spec)
    if not missing:
        return path, 0
    target = spec.targets[0]
    base = spec.trial_base(target, "slim")
    modes = [_needed_splits(spec)[split] for split in missing]
    where = "in a Ray task" if _ray_is_up() else "here"
    print(f"building the annotation request for target {target!r}, retrain mode(s) "
          f"{', '.join(modes)} {where} (ERM reference model and GradCAM from the stage cache, "
          "computed first if absent) ...", flush=True)
    rows = _request_rows(base, slim, modes, path, spec.resources)
    kept = read_request_rows(path) if path.is_file() else []
    write_annotation_request(path, [*kept, *rows])
    return path, len(rows)


def _ray_is_up() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def build_request(base: dict[str, Any], knobs: Any, modes: Sequence[str], name: str
                  ) -> tuple[list[dict[str, Any]], str, dict[str, bytes]]:
    """The request rows of every mode in ``modes``, built where this runs: (rows, the folder
    their overlays were written to, {file name: bytes} of that folder), so the caller can
    put the overlays beside the CSV on its own machine."""
    import tempfile

    import torch

    from debias.cache import StageCache
    from debias.slim.modes import annotation_request_rows

    config = TrialConfig.of(base)
    data = config.load_data()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = StageCache(config.cache_dir)
    with tempfile.TemporaryDirectory(prefix="debias-request-") as tmp:
        local = Path(tmp) / name
        rows = [row for mode in modes for row in annotation_request_rows(
            config, knobs.model_copy(update={"retrain": mode}), data, cache, device, local)]
        folder = local.with_name(f"{local.stem}_overlays")
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return rows, str(folder), files


def _request_rows(base: dict[str, Any], knobs: Any, modes: Sequence[str], path: Path,
                  resources: Resources) -> list[dict[str, Any]]:
    """Build the request where the trials would run: with a sweep's Ray up, as a Ray task
    with the sweep's per-trial resources (the reference model and GradCAM want the workers'
    GPU, not the head's CPU); without one (``--annotate`` on a laptop), in this process.
    The overlays come back as bytes and are written beside ``path`` here."""
    from debias.files import atomic_write_bytes

    if _ray_is_up():
        import ray

        task = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu,
                          max_retries=1)(build_request)
        rows, remote, files = ray.get(task.remote(base, knobs, list(modes), path.name))
    else:
        rows, remote, files = build_request(base, knobs, modes, path.name)
    folder = path.with_name(f"{path.stem}_overlays")
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, data in files.items():
        atomic_write_bytes(folder / file_name, data)
    for row in rows:
        for key in ("image_path", "overlay_path"):
            if str(row[key]).startswith(remote):
                row[key] = str(folder / Path(row[key]).name)
    return rows


def check_request(spec: Spec, dry_run: bool = False) -> None:
    """Before any trial of a SLIM sweep with a person annotating: the file must exist with
    rows for every retrain mode the sweep can take, answered, readable by the reader the
    trials use. Where rows are missing (or the file is), build them here, once (reference
    model and GradCAM go to the stage cache the trials then reuse), and stop with what to
    do next. A dry run only says so: building rows trains the reference model.

    Raises :class:`~debias.methods.base.PreflightError` with the next step to take."""
    from debias.methods.base import PreflightError
    from debias.slim.annotations import check_annotation_file

    path = Path(_knobs(spec).annotations)
    annotate = annotate_command(spec.source, spec.overrides)
    missing: list[str] = []
    try:
        if dry_run:
            missing = missing_request_splits(spec)
            if missing:
                print(f"note: slim.annotations {path} has no rows yet for split(s) "
                      f"{', '.join(missing)}; the first real run (or --annotate) writes them "
                      "there and stops before any trial.")
        else:
            existed = path.is_file()
            _, added = ensure_request(spec)
            if added:
                what = (f"{added} rows for another retrain mode were added to {path}" if existed
                        else f"{path} did not exist, so the annotation request was written "
                             "there")
                raise PreflightError(
                    f"slim.annotations: {what} (GradCAM overlays in {path.stem}_overlays/ "
                    f"beside it). Answer it in the browser with `{annotate}`, or fill its "
                    "'annotation' column by hand (1 = attention on the core object, 0 = not, "
                    "-1 = unsure); then run the sweep again.")
        if path.exists():  # what a trial would read must read: checked before any trial
            for split in _needed_splits(spec):
                if split not in missing:
                    check_annotation_file(path, split=split)
    except AnnotationError as exc:
        raise PreflightError(f"slim.annotations: {exc}") from None


def _launch(sweep: str, overrides: Sequence[str], *more: str) -> str:
    """``python launch.py SWEEP --set ... MORE``, every argument shell-quoted, credentials
    masked: the one function that builds every printed command."""
    from debias.commands import launch_command

    return launch_command(sweep, overrides, *more)


def _sets(overrides: Sequence[str], key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in overrides)


def sweep_command(sweep: str, overrides: Sequence[str], csv_path: Path) -> str:
    """The command that runs the sweep with the answers: ``python launch.py SWEEP``, every
    ``--set`` given to --annotate in its order, and ``--set slim.annotations=CSV`` unless one
    of them already sets it (so the command names the file that was answered whatever the
    sweep file or the environment says), each argument shell-quoted."""
    more = [] if _sets(overrides, "slim.annotations") else ["--set",
                                                            f"slim.annotations={csv_path}"]
    return _launch(sweep, overrides, *more)


def annotate_command(sweep: str, overrides: Sequence[str]) -> str:
    """The ``--annotate`` command for this sweep with these ``--set`` overrides (for messages
    that send a person to the annotation page), each argument shell-quoted."""
    return _launch(sweep, overrides, "--annotate")


def run_annotate(spec: Spec, sweep: str, overrides: Sequence[str],
                 port: int | None = None) -> int:
    """The ``--annotate`` command: build the request if needed, serve the page until
    Ctrl-C (or SIGTERM)."""
    from debias.data import DatasetError

    try:
        csv_path, _ = ensure_request(spec)
        chosen = free_port(DEFAULT_PORT if port is None else port)
        if port and chosen != port:
            print(f"error: port {port} on {HOST} is in use; pick another with --port",
                  file=sys.stderr)
            return 1
        command = sweep_command(sweep, overrides, csv_path)
        url, server = start_annotation_server(csv_path, command, chosen, title=spec.name,
                                              target=spec.targets[0])
    except (AnnotationError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def progress(store: AnnotationStore) -> None:
        items = store.items()
        done = sum(item["annotation"] is not None for item in items)
        print(f"saved: {done} of {len(items)} answered", flush=True)
        if done == len(items):
            print(f"all answered; run the sweep with:\n  {command}", flush=True)

    server.on_answer = progress
    with stop_signals_as_interrupt():
        try:
            print(f"annotation page for {csv_path}:\n  {url}\nanswers are saved to the CSV as "
                  "you go; Ctrl-C stops the page.", flush=True)
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nstopping the annotation page", flush=True)
            return 0
        finally:
            stop_annotation_server(server)
