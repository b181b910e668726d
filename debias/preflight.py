"""Everything knowable before Ray starts, checked before anything is written.

The data is there and every split can be scored; each method's own needs are met (SLIM: a
person's answers); a sweep with results is not silently run again; and ``--resume`` runs the
configuration the results came from, or says which keys changed. A problem is one
:class:`PreflightFailed` whose message says what to do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from debias.commands import sweep_command
from debias.data import DatasetError
from debias.environment import EnvironmentProblem, check_environment, redact_uri, sqlite_path
from debias.files import atomic_write_text
from debias.methods.base import PreflightError
from debias.redaction import redact
from debias.spec import Spec
from debias.tracking import Tracker, flatten

__all__ = ["RESUMABLE_KEYS", "PreflightFailed", "check_resume_config", "check_state",
           "preflight", "record_config", "resume_command", "sweep_dir"]

log = logging.getLogger("debias")

#: Keys that may change between a run and its ``--resume``: where and how many trials run,
#: never what a trial computes. (A trial's own numbers do not depend on them.)
RESUMABLE_KEYS = ("resources.", "search.max_concurrent", "max_failures")
CONFIG_FILE = "sweep.json"


class PreflightFailed(RuntimeError):
    """The sweep cannot start; the message says what to do."""


def sweep_dir(spec: Spec) -> Path:
    return spec.storage / spec.name


def preflight(spec: Spec, dry_run: bool = False, resume: bool = False,
              methods: bool = True) -> None:
    """Before anything is written: the environment (name, tracking store, storage, weights,
    the experiment), the data is there and every split can be scored, then (unless
    ``methods`` is False: a sweep runs them once its Ray is up) each method's own needs."""
    try:
        check_environment(spec, resume)
    except EnvironmentProblem as exc:
        raise PreflightFailed(str(exc)) from None
    for target in spec.targets:
        try:
            data = spec.load_data(target)
        except DatasetError as exc:
            raise PreflightFailed(f"{exc}{spec.env_note('dataset.root')}") from None
        for split in ("train", "val"):
            if len(data.view(split)) == 0:
                raise PreflightFailed(f"dataset {data.name}: the {split} split has no samples "
                                      f"(target {target}, bias {data.bias})")
        empty = [(split, y, a) for split in ("val", "test")
                 for y, row in enumerate(data.group_counts(split))
                 for a, n in enumerate(row) if n == 0]
        if empty:
            log.warning("target %s: groups with no samples (skipped in worst-group accuracy): "
                        "%s", target, empty)
    if methods:
        method_preflight(spec, dry_run)


def method_preflight(spec: Spec, dry_run: bool = False) -> None:
    """Each method's own needs before its trials (SLIM with a person annotating: the request
    is there and answered). Work they do runs as Ray tasks once a sweep's Ray is up."""
    for method in spec.methods:
        try:
            spec.method_class(method).preflight(spec, dry_run)
        except (PreflightError, DatasetError) as exc:
            raise PreflightFailed(str(exc)) from None


def resume_command(spec: Spec) -> str:
    """The ``--resume`` command of this sweep (every ``--set`` kept, credentials masked)."""
    return sweep_command(spec, "--resume")


def check_state(spec: Spec, resume: bool) -> None:
    """A sweep whose results exist runs again only with ``--resume``; one that does not
    exist cannot be resumed."""
    where = ""
    store = sqlite_path(spec.tracking_uri)
    if (sweep_dir(spec) / CONFIG_FILE).exists():
        where = f"in {sweep_dir(spec)}"
    elif store is not None and not store.is_file():
        pass  # no sqlite store yet, so no runs in it (and opening it would take ~2 s)
    else:  # same name and store, other storage: the runs would mix in one experiment
        try:
            if Tracker(spec.tracking_uri, spec.name, create=False).parent_runs():
                where = f"in MLflow ({redact_uri(spec.tracking_uri)})"
        except LookupError:
            pass
    if where and not resume:
        raise PreflightFailed(
            f"sweep {spec.name!r} already has results {where}. Pass --resume to continue it "
            f"(`{resume_command(spec)}`; a finished sweep just reprints its report), or give "
            "this run another name with --set name=NEW_NAME.")


def _flat(spec: Spec) -> dict[str, str]:
    """The configuration a sweep's results depend on, as flat ``key: value`` strings, with
    credentials masked (this is written to disk)."""
    config = {k: v for k, v in spec.config.items() if k != "study"}
    out = flatten(config)
    for d in spec.space:
        out[f"search.space.{d.path}"] = d.describe()
    return {k: redact(v) for k, v in out.items()}


def record_config(spec: Spec) -> None:
    """Write the configuration beside the results, for ``--resume`` to compare against."""
    path = sweep_dir(spec) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_flat(spec), indent=1, sort_keys=True) + "\n")


def check_resume_config(spec: Spec) -> None:
    """``--resume`` refuses a changed configuration, naming each changed key, before Ray
    starts: trials would run the new config while their runs and the search's state hold
    the old one."""
    path = sweep_dir(spec) / CONFIG_FILE
    if not path.is_file():
        return
    old = {k: redact(v) for k, v in json.loads(path.read_text()).items()}
    new = _flat(spec)
    changed = [(k, old.get(k, "(absent)"), new.get(k, "(absent)"))
               for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_KEYS)]
    if changed:
        lines = "; ".join(f"{k}: {a} → {b}" for k, a, b in changed)
        raise PreflightFailed(
            f"--resume: sweep {spec.name!r} was started with another configuration ({lines}). "
            "A resumed sweep must run what it started with: undo the change, or run the new "
            "configuration as a new sweep with --set name=NEW_NAME.")
