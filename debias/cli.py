"""Command line: parse arguments, call the package, turn known errors into clear messages."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from debias import redaction
from debias.commands import sweep_command
from debias.jobs import REMOTE_WORKDIR_ENV
from debias.spec import Spec, SpecError, load_spec

__all__ = ["main"]

#: How long the exit waits for threads that are not daemons (the MLflow writer's journal is
#: closed by an exit handler after this, with its own bound).
EXIT_JOIN_S = 30.0


def _parser() -> argparse.ArgumentParser:
    def integer(text: str, low: int, high: int | None, expected: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"got {text!r}; expected {expected}")
        return value

    def port(text: str) -> int:
        return integer(text, 0, 65535, "a port number in 0..65535 (0: any free port)")

    def num_cpus(text: str) -> int:
        return integer(text, 1, None, "a whole number of CPUs >= 1 (or leave it out: all)")

    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Run a debiasing sweep: per target attribute, a hyperparameter search "
                    "(Ray Tune + Optuna), then the best config over every seed; all tracked "
                    "in MLflow.")
    p.add_argument("sweep", nargs="?",
                   help="sweep file (YAML), e.g. sweeps/quickstart.yaml")
    p.add_argument("--schema", action="store_true",
                   help="print the sweep file's JSON Schema (every section, every method's) "
                        "and exit; sweeps/sweep.schema.json is this output")
    p.add_argument("--compare", nargs="+", metavar="NAME", default=None,
                   help="the comparison table of sweeps already in the store (experiment "
                        "names), one row per (target, method), paired against ERM; the store "
                        "is the sweep file's if one is given, else --tracking-uri")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                   help="with --compare and no sweep file: the MLflow store (default: "
                        "sqlite:///mlflow.db)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key with a YAML value, e.g. --set train.epochs=2 "
                        "(repeatable; validated like the file)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the file and the data, print the plan, run nothing")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. auto, ray://head:10001); default: RAY_ADDRESS "
                        "or a local Ray started for this sweep")
    p.add_argument("--num-cpus", type=num_cpus, default=None,
                   help="CPUs for a local Ray (default: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (finished trials are kept, running ones "
                        "restart from their last checkpoint); refused if the configuration "
                        "changed")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run trials that failed max_failures times again "
                        "(by default they stay failed)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write each pipeline's selected models (the best config, every "
                        "reported seed) with their metrics from MLflow into DIR")
    p.add_argument("--sync", action="store_true",
                   help="upload tracking writes a tracking outage left pending (they are "
                        "journaled under the sweep's storage), then exit")
    p.add_argument("--verbose", action="store_true",
                   help="Ray Tune's own status tables and logs instead of the compact view")
    p.add_argument("--report", action="store_true",
                   help="print the per-target table from MLflow without running anything")
    p.add_argument("--submit", action="store_true",
                   help="run the sweep's driver as a Ray Job on the cluster whose dashboard is "
                        "--address (e.g. http://127.0.0.1:8265 via `ray dashboard cluster.yaml`)"
                        "; it keeps running when this machine disconnects")
    p.add_argument("--remote-workdir", default="~/debias-sweep",
                   help="with --submit: the head's folder that relative paths in the sweep "
                        "file resolve against (default: ~/debias-sweep)")
    p.add_argument("--status", metavar="NAME", default=None,
                   help="show the submitted jobs of sweep NAME (needs --address), their logs "
                        "and where their MLflow runs are")
    p.add_argument("--ui", action="store_true",
                   help="open the MLflow UI of the sweep's tracking store on 127.0.0.1 and "
                        "print the experiment's URL; Ctrl-C stops it")
    p.add_argument("--annotate", action="store_true",
                   help="SLIM: annotate the GradCAM overlays in a local web page (the request "
                        "CSV slim.annotations is built first if absent); answers are saved as "
                        "you go")
    p.add_argument("--port", type=port, default=None,
                   help="with --ui or --annotate: the port on 127.0.0.1 (default: 5000 / 8765 "
                        "if free, else any; 0: any free port)")
    # Issue 20: the real-data path without the real data, and what a sweep will cost.
    p.add_argument("--write-dataset", nargs=2, metavar=("LAYOUT", "DIR"), default=None,
                   help="write the embedded benchmark into DIR in a published layout "
                        "(waterbirds, celeba, celeba-official, metadata), so DEBIAS_DATA=DIR "
                        "runs the real-data sweep files on it; no sweep file needed")
    p.add_argument("--images", type=lambda t: integer(t, 24, None, "a whole number >= 24"),
                   default=1000, help="with --write-dataset: how many images (default 1000)")
    p.add_argument("--image-size", default=None, metavar="PX|WxH",
                   help="with --write-dataset: image size, e.g. 224 or 178x218 (default: "
                        "178x218 for CelebA, 256 otherwise)")
    def rate(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"got {text!r}; expected a positive number")
        return value

    p.add_argument("--images-per-s", type=rate, default=None, metavar="RATE",
                   help="with --dry-run: the training images/s of one trial on the device the "
                        "sweep will run on (default: one training step timed on this "
                        "machine's device)")
    return p


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its exit handlers have run, without the
    interpreter's teardown.

    After a sweep that teardown (freeing torch's, Ray's and MLflow's module graphs and their
    C++ state) takes seconds on 2 cores and does nothing a sweep needs: the exit handlers still
    run (Ray's shutdown, logging's flush, the MLflow writer's journal), threads that are not
    daemons are joined, the streams are flushed. A quickstart user waits that much less, and
    so does every test that launches a driver."""
    # Idle worker threads of thread pools (MLflow's artifact downloads keep some) wait for
    # work for ever: tell them to end, as the interpreter's shutdown would, then join what
    # is left, for a bounded time (a thread that still does not end is given up on).
    with contextlib.suppress(Exception):
        from concurrent.futures import thread as pool_threads

        pool_threads._python_exit()
    main_thread = threading.main_thread()
    deadline = time.monotonic() + EXIT_JOIN_S
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Every command; an interrupt (Ctrl-C, SIGTERM, a closed terminal) anywhere ends it with
    one line and exit 130, never a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("\ninterrupted", file=sys.stderr, flush=True)
        return 130


def _usage_errors(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that do not go together (argparse exits with the message)."""
    if (args.status is not None or args.submit) and not args.address:
        parser.error("--status and --submit need --address (the head's dashboard, e.g. "
                     "http://127.0.0.1:8265)")
    if args.sweep is None and args.status is None and not args.schema \
            and args.write_dataset is None and args.compare is None:
        parser.error("the sweep file is required (except with --status NAME, --schema or "
                     "--compare NAME ...)")
    if args.ui and args.annotate:
        parser.error("--ui and --annotate are separate commands; pass one")
    if args.port is not None and not (args.ui or args.annotate):
        parser.error("--port goes with --ui or --annotate")


def _schema(args: argparse.Namespace) -> int:
    from debias.schema import schema_json

    print(schema_json(), end="")
    return 0


def _write_dataset(args: argparse.Namespace) -> int:
    from debias.data.export_layouts import write_dataset_command

    return write_dataset_command(*args.write_dataset, images=args.images, size=args.image_size)


#: Commands that need no sweep file, by the flag that asks for one, first match wins.
_FILELESS: tuple[tuple[Callable[[argparse.Namespace], bool],
                       Callable[[argparse.Namespace], int]], ...] = (
    (lambda a: a.status is not None, lambda a: _status(a.status, a.address)),
    (lambda a: a.schema, _schema),
    (lambda a: a.write_dataset is not None, _write_dataset),
    (lambda a: a.compare is not None and a.sweep is None,
     lambda a: _compare(a.compare, a.tracking_uri, Path("debias_results"))),
)

#: Commands on a loaded sweep file, by their flag, first match wins; without one the sweep
#: runs (or --report / --dry-run / --submit, see :func:`_run`).
_ON_SWEEP: tuple[tuple[str, Callable[[Spec, argparse.Namespace], int]], ...] = (
    ("compare", lambda spec, a: _compare(a.compare, spec.tracking_uri, spec.storage)),
    ("export", lambda spec, a: _export(spec, Path(a.export))),
    ("sync", lambda spec, a: _sync(spec)),
    ("ui", lambda spec, a: _ui(spec, a.port)),
    ("annotate", lambda spec, a: _method_command(spec, "annotate", a)),
)


def _load(args: argparse.Namespace) -> Spec | None:
    """The sweep file with its overrides, its tracking URI's masked credentials filled in
    from the environment; None with the error printed."""
    # A driver submitted as a Ray Job resolves relative paths against the head's workdir.
    workdir = os.environ.get(REMOTE_WORKDIR_ENV)
    cwd = Path(workdir).expanduser() if workdir else None
    try:
        spec = load_spec(args.sweep, args.overrides, cwd=cwd)
        uri, note = redaction.unmask_uri(spec.tracking_uri)
    except (SpecError, redaction.MaskedCredentials) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    spec = spec.with_tracking_uri(uri)
    redaction.install(uri)
    if note:
        print(note, file=sys.stderr)
    return spec


def _main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    redaction.install(args.tracking_uri)
    _usage_errors(parser, args)
    for asked, command in _FILELESS:
        if asked(args):
            return command(args)
    spec = _load(args)
    if spec is None:
        return 2
    for flag, on_sweep in _ON_SWEEP:
        if getattr(args, flag) not in (None, False):
            return on_sweep(spec, args)
    return _run(spec, args)


def _run(spec: Spec, args: argparse.Namespace) -> int:
    """The sweep itself (or its --report, --submit, --dry-run): the plan, then the runs."""
    from debias.environment import EnvironmentProblem, check_dataset_memory

    try:  # before the plan, which may already read (generate) the data
        check_dataset_memory(spec.dataset)
    except EnvironmentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from debias.preflight import PreflightFailed
    from debias.sweep import SweepError, SweepInterrupted, describe_plan

    try:
        if args.report:
            return _report(spec, log_artifacts=False)
        print(describe_plan(spec), flush=True)
        if args.submit:
            return _submit(spec, args)
        if args.dry_run:
            return _dry_run(spec, args)
        return _sweep(spec, args)
    except SweepInterrupted as exc:
        print(f"\ninterrupted: {exc}", file=sys.stderr)
        return 130
    except (SweepError, PreflightFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dry_run(spec: Spec, args: argparse.Namespace) -> int:
    from debias.cache_space import check_decoded_space
    from debias.estimate import estimate_line
    from debias.preflight import preflight

    preflight(spec, dry_run=True, resume=args.resume)
    check_decoded_space(spec)  # this machine's disk (a run checks every node's)
    print(estimate_line(spec, args.images_per_s, num_cpus=args.num_cpus), flush=True)
    print("dry run: the sweep file and the data are valid; nothing was run.")
    return 0


def _sweep(spec: Spec, args: argparse.Namespace) -> int:
    from debias.sweep import run_sweep

    if args.verbose:
        os.environ["DEBIAS_VERBOSE"] = "1"
    outcome = run_sweep(spec, address=args.address, resume=args.resume,
                        num_cpus=args.num_cpus, retry_failed=args.retry_failed)
    if outcome.pending_writes:
        print(f"\nthe sweep ran every trial, but the MLflow tracking server did not take "
              f"{outcome.pending_writes} write(s); they are journaled in "
              f"{outcome.journal}. Once it answers, upload them with "
              f"`{sweep_command(spec, '--sync')}` (or --resume); the report follows.",
              file=sys.stderr)
        return 3
    if outcome.dropped:
        print(f"\n{_dropped_hint(spec, outcome.dropped, outcome.journal)}", file=sys.stderr)
    code = _report(spec, log_artifacts=True)
    if outcome.dropped and code:
        print(_dropped_hint(spec, outcome.dropped, outcome.journal), file=sys.stderr)
    return code


def _dropped_hint(spec: Spec, dropped: int, journal: Path) -> str:
    """What to run when MLflow refused some of the sweep's writes for good."""
    return (f"MLflow refused {dropped} of this sweep's write(s) (each is listed with its "
            f"reason in {journal / 'dropped.jsonl'}); every trial ran and Ray kept its "
            f"record: `{sweep_command(spec, '--resume')}` writes the runs again from it")


def _submit(spec: Spec, args: argparse.Namespace) -> int:
    from debias.jobs import JobError, submit_sweep

    try:
        job = submit_sweep(spec, args.sweep, args.overrides, args.address,
                           args.remote_workdir, resume=args.resume)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"submitted {job}; follow it with: python launch.py --status {spec.name} "
          f"--address {args.address}")
    return 0


def _status(name: str, address: str) -> int:
    from debias.jobs import JobError, job_status

    try:
        text, jobs = job_status(name, address)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0 if jobs else 1


def _ui(spec: Spec, port: int | None) -> int:
    from debias.ui import run_ui

    return run_ui(spec.tracking_uri, spec.name, port)


def _method_command(spec: Spec, command: str, args: argparse.Namespace) -> int:
    """``--<command>`` of a method of the sweep (:attr:`Method.commands`), e.g. SLIM's
    ``--annotate``: the CLI knows no method, it asks the sweep's."""
    import importlib

    from debias.methods import resolve_method

    for name in spec.methods:
        target = resolve_method(name).commands.get(command)
        if target:
            module, _, function = target.partition(":")
            run = getattr(importlib.import_module(module), function)
            return int(run(spec, args.sweep, args.overrides, args.port))
    print(f"error: --{command} is a command of a method this sweep does not run; sweep "
          f"{spec.name!r} runs {', '.join(spec.methods)}", file=sys.stderr)
    return 1


def _open_tracker(uri: str, name: str) -> Any:
    """The tracker of an existing experiment with runs, or None with the reason printed.
    Nothing is created when there is nothing to report: not an absent sqlite store (checked
    before MLflow opens it), not a deleted or missing experiment."""
    from mlflow.exceptions import MlflowException

    from debias.environment import EnvironmentProblem, check_report_store
    from debias.tracking import Tracker, redact_uri

    try:
        check_report_store(uri, name)
    except EnvironmentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    try:
        tracker = Tracker(uri, name, create=False)
        if not tracker.parent_runs():
            print(f"error: sweep {name!r} has no runs in MLflow ({redact_uri(uri)}) yet: "
                  "nothing to report; run the sweep first", file=sys.stderr)
            return None
        return tracker
    except LookupError as exc:
        print(f"error: {exc}; run the sweep first", file=sys.stderr)
    except MlflowException as exc:
        print(f"error: MLflow at {redact_uri(uri)}: {redact_uri(str(exc))}", file=sys.stderr)
    return None


def _report(spec: Spec, log_artifacts: bool) -> int:
    from debias.plots import SWEEP_FIGURES, safe_name, sweep_plots
    from debias.report import collect, render_text, row_metrics, starved_notes, write_report

    tracker = _open_tracker(spec.tracking_uri, spec.name)
    if tracker is None:
        return 1
    rows = collect(tracker)
    notes = report_notes(spec) + starved_notes(tracker)
    folder = spec.storage / spec.name
    md, csv_path = write_report(rows, folder, notes)
    print(f"\nResults of sweep {spec.name!r} ({', '.join(spec.methods)}), test metrics over "
          "seeds (mean ± 95% CI, Student t):\n")
    print(render_text(rows))
    for note in notes:
        print(f"  - {note}")
    plots = sweep_plots(tracker, folder / "plots", log_params={d.path for d in spec.space
                                                               if d.log})
    print(f"\nwritten: {md}, {csv_path}")
    if plots:
        print(f"plots: {', '.join(str(p) for p in plots.values())}")
    print(f"MLflow: {sweep_command(spec, '--ui')}  (the runs table of this sweep)")
    if log_artifacts:
        parents = {r.info.run_id: r for r in tracker.parent_runs().values()}
        for row in rows:
            # 4 decimals (0.01 points): what the runs table shows (0.7399999999999999)
            tracker.log_metrics(row.parent_id, {k: round(v, 4)
                                                for k, v in row_metrics(row).items()})
            name = parents[row.parent_id].info.run_name if row.parent_id in parents else ""
            mine = [p for stem, p in plots.items()
                    if stem in SWEEP_FIGURES or stem.endswith(f"_{safe_name(name)}")]
            for path in (md, csv_path, *mine):
                tracker.log_artifact(row.parent_id, path)
        if spec.is_study:
            from debias.tables import describe_study

            study = tracker.open_study({"sweep": spec.name, "methods": ",".join(spec.methods)})
            describe_study(tracker, study, rows, notes, folder)  # its description, report.md
            for path in (csv_path, *(p for stem, p in plots.items() if stem == "test_wga")):
                tracker.log_artifact(study, path)
    if spec.tracking_uri.startswith(("http://", "https://")):
        from debias.ui import server_comparison_url

        with contextlib.suppress(Exception):  # the URL is a convenience: never fail for it
            print(f"MLflow runs table, on the comparison: "
                  f"{server_comparison_url(spec.tracking_uri, spec.name)}")
    return 0


def report_notes(spec: Spec) -> list[str]:
    """What a reader of the table must know: the selection rule, the seeds, each method's
    caveats."""
    from debias.sections import LABEL_FREE_METRICS

    metric = spec.search.metric
    rule = ("reads no bias labels" if metric in LABEL_FREE_METRICS
            else "reads validation bias labels")
    from debias.sweep import num_search_trials

    trials = ", ".join(f"{m} {num_search_trials(spec, m)}" for m in spec.methods)
    among = "; ".join(f"{m}: {spec.method_class(m).steps(spec.context(m))}"
                      for m in spec.methods)
    notes = [f"selection: {metric} ({spec.search.mode}) {rule}",
             f"budget: search trials per target: {trials} (equal trials, where a method has "
             f"keys to search); within a trial the selection picks among {among}",
             f"search trials trained with seed {spec.search_seed}; the reported seeds "
             f"{spec.seeds} are fresh runs of the best config (its shared stages re-run per "
             "seed)"]
    for method in spec.methods:
        cls = spec.method_class(method)
        notes += cls.report_notes(spec.params_of(method))
    return notes


def _sync(spec: Spec) -> int:
    """Upload what a tracking outage left journaled, then print the report."""
    from debias.tracking_writer import LockHeld, default_journal_dir, journal_pending, replay

    journal = default_journal_dir(spec.storage, spec.name)
    pending = journal_pending(journal)
    try:
        written = replay(spec.tracking_uri, spec.name, journal, retry_for_s=30)
    except LockHeld as exc:
        print(f"error: the sweep's journal is in use ({exc}); is the sweep still running?",
              file=sys.stderr)
        return 1
    left = journal_pending(journal)
    print(f"--sync: {written} of {pending} journaled write(s) uploaded, {left} left")
    if left:
        print(f"error: the tracking server did not take {left} write(s); once it answers, "
              f"run `{sweep_command(spec, '--sync')}` again", file=sys.stderr)
        return 1
    return _report(spec, log_artifacts=True)


def _export(spec: Spec, folder: Path) -> int:
    from debias.export import export_sweep

    if folder.exists() and not folder.is_dir():
        print(f"error: --export {folder}: that is a file, not a folder; name a folder (it "
              "is created if absent)", file=sys.stderr)
        return 1
    tracker = _open_tracker(spec.tracking_uri, spec.name)
    if tracker is None:
        return 1
    written = export_sweep(tracker, folder)
    for path in written:
        print(f"exported {path}")
    if not written:
        print(f"error: sweep {spec.name!r} has no finished seeds runs with a logged model yet",
              file=sys.stderr)
        return 1
    return 0


def _compare(names: Sequence[str], uri: str, storage: Path) -> int:
    from debias.report import collect, render_text, write_report

    trackers = []
    for name in names:
        tracker = _open_tracker(uri, name)
        if tracker is None:
            return 1
        trackers.append(tracker)
    from debias.report import AmbiguousReference

    try:
        rows = collect(trackers)
    except AmbiguousReference as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = storage / "compare" / "+".join(names)
    md, csv_path = write_report(rows, folder)
    print(f"\nComparison of {', '.join(names)}, test metrics over seeds (mean ± 95% CI):\n")
    print(render_text(rows))
    print(f"\nwritten: {md}, {csv_path}")
    return 0
