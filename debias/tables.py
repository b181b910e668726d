"""The compact comparison table of a sweep (a row per method and target), for where the full
report table does not fit: the study run's description in MLflow (its Overview renders it as
Markdown) and the README's result blocks.

The README's tables are generated from the sweep's MLflow record (what ``--report`` reads),
never hand-copied::

    .venv/bin/python -m debias.tables sweeps/quickstart.yaml --out docs/results/quickstart.md

writes that sweep's table to ``--out`` and replaces the README block between
``<!-- results: docs/results/quickstart.md -->`` and ``<!-- /results -->`` with the same text
(``--set`` overrides as for the sweep; ``--readme ''`` writes the file only).
``tests/test_readme.py`` fails when a README block differs from its file.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from debias.display import format_config

__all__ = ["BLOCK", "compact_markdown", "describe_study", "main", "readme_blocks",
           "replace_block"]

#: A generated README block: ``<!-- results: FILE -->`` TEXT ``<!-- /results -->``.
BLOCK = re.compile(r"<!-- results: (?P<file>\S+) -->\n(?P<text>.*?)<!-- /results -->", re.S)


def _signed(stat: Any) -> str:
    """A paired difference: ``+25.7 ± 25.4``; ``—`` where there is none (ERM itself)."""
    if stat.n == 0 or math.isnan(stat.mean):
        return "—"
    sign = "+" if stat.mean >= 0 else "−"
    if stat.n == 1:
        return f"{sign}{100 * abs(stat.mean):.1f} (1 seed)"
    return f"{sign}{100 * abs(stat.mean):.1f} ± {100 * stat.ci95:.1f}"


def compact_markdown(rows: Sequence[Any], notes: Sequence[str] = (),
                     title: str | None = None, against: str = "ERM") -> str:
    """The comparison as a narrow Markdown table: method (and target, when there are
    several), test WGA and average accuracy (mean ± 95% CI over seeds, Student t), the paired
    WGA difference against ERM, and which bias labels training and selection read; each
    method's best config (3 significant digits) and the notes as a list below it."""
    several = len({r.target for r in rows}) > 1
    # Short headers: MLflow's artifact viewer gives every column the same width and cuts
    # what does not fit; the legend above the table says what each one is.
    header = [*(["target"] if several else []), "method", "test WGA %", "test acc %", "Δ WGA",
              "bias labels"]
    legend = ("each method's best config on the test split, mean ± 95% CI over seeds "
              "(Student t): worst-group accuracy (WGA), average accuracy (acc), the paired "
              "WGA difference against {against} on the same seeds (Δ); bias labels read "
              "for training / by the selection rule")
    legend = legend.format(against=against)
    lines = [f"{title}: {legend}\n" if title else f"{legend[0].upper()}{legend[1:]}.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        select = "val" if r.selection_reads_bias else "none"
        cells = [*([r.target] if several else []), r.method, str(r.test_wga),
                 str(r.test_avg), _signed(r.delta_wga), f"{r.bias_labels} / {select}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(line for line in lines if line) + "\n"
    seeds = sorted({s for r in rows for s in r.seeds})
    facts = [f"seeds {', '.join(map(str, seeds))}: fresh runs of each method's best config"
             if seeds else "no finished seeds yet"]
    facts += [f"best config of {r.method}{f' ({r.target})' if several else ''}: "
              f"{format_config(r.best_params) or '(the file values)'}" for r in rows]
    return text + "\n" + "\n".join(f"- {line}" for line in [*facts, *notes]) + "\n"


def describe_study(tracker: Any, study_id: str, rows: Sequence[Any], notes: Sequence[str],
                   folder: Path) -> Path:
    """The study run's description (``mlflow.note.content``, rendered on its Overview page)
    and its ``report.md`` artifact: the compact table, which MLflow shows whole (the full
    report's ten columns run off the side of the artifact viewer). Returns the file."""
    table = compact_markdown(rows, notes, title=f"Comparison of sweep {tracker.experiment!r}")
    tracker.client.set_tag(study_id, "mlflow.note.content", table)
    path = Path(folder) / "study" / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    tracker.log_artifact(study_id, path)
    return path


def readme_blocks(text: str) -> dict[str, str]:
    """{file: the README's copy of it} for every generated block."""
    return {m.group("file"): m.group("text") for m in BLOCK.finditer(text)}


def replace_block(text: str, file: str, content: str) -> str:
    """``text`` with the block of ``file`` replaced by ``content`` (which must exist)."""
    pattern = re.compile(rf"(<!-- results: {re.escape(file)} -->\n).*?(<!-- /results -->)",
                         re.S)
    if not pattern.search(text):
        raise LookupError(f"no `<!-- results: {file} -->` ... `<!-- /results -->` block")
    return pattern.sub(lambda m: m.group(1) + content + m.group(2), text, count=1)


def _against(rows: Sequence[Any], reference: Sequence[Any], name: str) -> list[Any]:
    """``rows`` with Δ paired against the same method, target and bias in ``reference``."""
    import dataclasses

    from debias.report import paired_difference

    out = []
    for r in rows:
        ref = next((x for x in reference if (x.method, x.target, x.bias)
                    == (r.method, r.target, r.bias)), None)
        if ref is None:
            raise LookupError(f"sweep {name!r} has no {r.method} row for target {r.target!r}")
        delta = paired_difference(r.wga_by_seed, ref.wga_by_seed)
        out.append(dataclasses.replace(r, delta_wga=delta, paired_with=name))
    return out


def _generate(sweep: str, overrides: Sequence[str], out: str, against: str | None = None
              ) -> str:
    from debias.report import collect
    from debias.spec import load_spec
    from debias.tracking import Tracker

    spec = load_spec(sweep, overrides)
    rows = collect(Tracker(spec.tracking_uri, spec.name, create=False))
    label = "ERM"
    if against:
        reference = collect(Tracker(spec.tracking_uri, against, create=False))
        rows = _against(rows, reference, against)
        label = f"the same method in sweep {against!r}"
    command = shlex.join([".venv/bin/python", "-m", "debias.tables", sweep,
                          *(a for o in overrides for a in ("--set", o)), "--out", out,
                          *(["--against", against] if against else [])])
    source = shlex.join([".venv/bin/python", "launch.py", sweep,
                         *(a for o in overrides for a in ("--set", o))])
    return (f"<!-- generated from the MLflow record of `{source}` by `{command}`; "
            "do not edit -->\n" + compact_markdown(rows, _selection(rows), against=label))


def _selection(rows: Sequence[Any]) -> list[str]:
    """Which rule selected the configs and epochs, and whether it read bias labels."""
    rules = {(r.selection, r.selection_reads_bias) for r in rows}
    return [f"selection: {metric} on validation, which reads "
            f"{'validation bias labels' if reads else 'no bias labels'}"
            for metric, reads in sorted(rules)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m debias.tables", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("sweep", help="the sweep file the results came from")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="the overrides the sweep ran with")
    p.add_argument("--out", required=True, help="the Markdown file to write (committed)")
    p.add_argument("--against", default=None, metavar="SWEEP",
                   help="pair each row with the same method's row of sweep SWEEP (same store: "
                        "an ablation against the study it varies) instead of with ERM")
    p.add_argument("--readme", default="README.md",
                   help="the README whose block of --out is replaced ('' for none)")
    args = p.parse_args(argv)
    try:
        text = _generate(args.sweep, args.overrides, args.out, args.against)
    except Exception as exc:  # a missing store or experiment: say so, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written: {args.out}")
    if args.readme:
        readme = Path(args.readme)
        try:
            readme.write_text(replace_block(readme.read_text(), args.out, text))
        except LookupError as exc:
            print(f"error: {args.readme}: {exc}", file=sys.stderr)
            return 1
        print(f"updated: {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
