"""Waterbirds (Sagawa et al. 2020) in its published layout: root/metadata.csv + image folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from debias.data.grouped import DatasetError, GroupedDataset, _readonly, content_source

ATTRIBUTES: tuple[str, ...] = ("Object", "Place")
COLUMNS: tuple[str, ...] = ("img_id", "img_filename", "y", "split", "place")
URL = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"
HOW_TO_GET = (f"Download {URL} and unpack it so that metadata.csv is directly under the "
              "configured root (dataset.root in the sweep file).")
_ALLOWED = {"y": (0, 1), "place": (0, 1), "split": (0, 1, 2)}


def check_pair(target: str, bias: str) -> str | None:
    """Object and Place, in either order (Place as target is a legitimate probe)."""
    for role, attr in (("target", target), ("bias", bias)):
        if attr not in ATTRIBUTES:
            return f"waterbirds: unknown {role} attribute {attr!r}; expected one of {ATTRIBUTES}"
    if target == bias:
        return f"waterbirds: target and bias are both {target!r}; they must differ"
    return None


def _fail(problem: str) -> DatasetError:
    return DatasetError(f"waterbirds: {problem}. {HOW_TO_GET}")


def _read_metadata(meta: Path) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Parse and validate metadata.csv; every bad value is reported with its line number."""
    try:
        with meta.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise _fail(f"{meta} is missing column(s) {missing}; found columns {header}, "
                            f"expected at least {list(COLUMNS)}")
            ids: list[str] = []
            files: list[str] = []
            values: dict[str, list[int]] = {k: [] for k in _ALLOWED}
            for line, row in enumerate(reader, start=2):
                for key, allowed in _ALLOWED.items():
                    raw = (row.get(key) or "").strip()
                    try:
                        value = int(float(raw))
                        ok = value in allowed and float(raw) == value
                    except (ValueError, OverflowError):
                        ok = False
                    if not ok:
                        raise _fail(f"{meta} line {line}: column {key!r} has value {raw!r}, "
                                    f"expected one of {allowed}")
                    values[key].append(value)
                ids.append((row.get("img_id") or "").strip())
                files.append((row.get("img_filename") or "").strip())
                if not files[-1]:
                    raise _fail(f"{meta} line {line}: empty img_filename")
    except UnicodeDecodeError as exc:
        raise _fail(f"{meta} is not a UTF-8 text CSV ({exc})") from exc
    except OSError as exc:
        raise _fail(f"could not read {meta} ({exc})") from exc
    if not ids:
        raise _fail(f"{meta} has a header but no rows")
    if len(set(ids)) != len(ids):
        raise _fail(f"{meta} has duplicate img_id values")
    return ids, files, {k: np.asarray(v, dtype=np.int64) for k, v in values.items()}


def load(cfg: dict, target: str, bias: str) -> GroupedDataset:
    """Read metadata.csv and check that every listed image exists before any training starts."""
    reason = check_pair(target, bias)
    if reason is not None:
        raise DatasetError(reason)
    if not cfg.get("root"):
        raise _fail("no dataset.root given in the sweep file; expected the directory holding "
                    "metadata.csv")
    root = Path(cfg["root"]).expanduser().resolve()
    image_size = cfg.get("image_size", 224)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise _fail(f"image_size must be a positive integer, got {image_size!r}")
    if not root.is_dir():
        raise _fail(f"root directory {root} does not exist; expected a directory holding "
                    "metadata.csv and the image folders")
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise _fail(f"{meta} not found; expected metadata.csv (columns {', '.join(COLUMNS)}) "
                    f"directly under {root}")
    ids, files, values = _read_metadata(meta)

    paths = tuple(root / f for f in files)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise _fail(f"{len(missing)} of {len(paths)} image files listed in {meta} are missing "
                    f"under {root}, e.g. {shown}")

    attrs = {"Object": values["y"], "Place": values["place"]}
    return GroupedDataset(
        name="waterbirds",
        target=target,
        bias=bias,
        ids=_readonly(np.asarray(ids, dtype=str)),
        split=_readonly(values["split"].astype(np.int8)),
        y=_readonly(attrs[target].copy()),
        a=_readonly(attrs[bias].copy()),
        image_size=image_size,
        images=None,
        image_paths=paths,
        masks=None,
        source=content_source(root, [meta], len(paths)),
    )
