"""The environment a sweep runs in, checked before anything is created or written.

The sweep file can be valid and the sweep still unable to run: the tracking database's driver
is not installed, the ``sqlite:///`` store is a folder or some other file, ``storage`` is a
file, the experiment of that name was deleted in MLflow, a ``backbone.weights`` file holds
something other than weights. Each check here raises one :class:`EnvironmentProblem` whose
message names the thing, its value (credentials redacted) and what to do, at once: never a
traceback, never MLflow retrying for minutes, never a trial failing three times over.

Nothing here writes anything; :func:`check_environment` runs every check in order. The checks
are cheap (a header read, a socket connect, one ``torch.load``) and import nothing heavy until
they need it, so the driver calls them on every run and on ``--dry-run``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from debias.redaction import redact, redact_uri, remember_uri

if TYPE_CHECKING:
    from debias.sections import Dataset

__all__ = ["RESERVED_NAMES", "EnvironmentProblem", "check_environment", "check_experiment",
           "check_name", "check_report_store", "check_storage", "check_tracking_server",
           "check_tracking_uri", "check_weights", "sqlite_path"]

#: Folders the project creates under ``storage`` beside each sweep's own ``<name>/``: a sweep
#: so named would put its results inside them (and deleting the stage cache, as the README
#: says to start afresh, would delete that sweep's results).
RESERVED_NAMES: dict[str, str] = {
    "cache": "the stage cache every sweep shares",
    "compare": "where --compare writes its tables",
}

SQLITE_HEADER = b"SQLite format 3\x00"
#: The module a SQLAlchemy driver imports -> the package that provides it.
DRIVER_PACKAGES = {
    "psycopg": '"psycopg[binary]"',
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
    "MySQLdb": "mysqlclient",
    "pymysql": "PyMySQL",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
    "oracledb": "oracledb",
}
DEFAULT_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}
#: Tracking URI schemes MLflow stores in a database through SQLAlchemy (sqlite apart).
DATABASE_SCHEMES = ("postgresql", "mysql", "mariadb", "mssql")


class EnvironmentProblem(RuntimeError):
    """The sweep cannot run in this environment; the message names what and says what to do.
    (A ``RuntimeError``, so a driver that catches those reports it without a traceback.)"""


# --------------------------------------------------------------------------- helpers


def _redact(uri: str) -> str:
    return redact_uri(uri)


def _scrub(text: str, uri: str) -> str:
    """``text`` with the URI's password removed wherever it appears (as given or decoded),
    for messages that quote an exception about the URI."""
    remember_uri(uri)
    return redact(text.replace(uri, _redact(uri)))


def _problem(uri: str, message: str) -> EnvironmentProblem:
    return EnvironmentProblem(_scrub(message, uri))


def _short(exc: BaseException, limit: int = 200) -> str:
    """The first informative line of an exception, at most ``limit`` characters."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # torch's long weights_only explanation
        after = text.split("WeightsUnpickler error:", 1)[1]
        text = next((line.strip() for line in after.splitlines() if line.strip()), text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (
        lines[0] if lines else type(exc).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other URIs and in-memory
    databases)."""
    scheme = uri.partition(":")[0].lower()
    if scheme.partition("+")[0] != "sqlite" or not uri.partition(":")[2].startswith("//"):
        return None
    rest = uri.split("://", 1)[1]
    database = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel, sqlite:////abs
    database = database.split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return Path(unquote(database)).expanduser()


# --------------------------------------------------------------------------- tracking


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """The tracking store can be used now, without retrying for minutes.

    ``http(s)://`` answers ``/health`` within ``timeout_s`` (credentials in the URI are sent
    as basic auth, never as part of the host name, and never printed); a database URI
    (``postgresql://``, ``mysql://``, ``mssql://``) has its SQLAlchemy driver installed and
    its server accepts a connection; a ``sqlite:///`` file is a SQLite database (or absent,
    or empty) in a folder that exists and is writable."""
    scheme = uri.partition(":")[0].lower() if ":" in uri else ""
    base = scheme.partition("+")[0]
    if base in ("http", "https"):
        _check_http(uri, timeout_s)
    elif base == "sqlite":
        _check_sqlite(uri)
    elif base in DATABASE_SCHEMES:
        _check_database(uri, timeout_s)
    elif base == "postgres":
        raise _problem(uri, f"tracking.uri: got {_redact(uri)!r}; SQLAlchemy (and so MLflow) "
                            "spells the scheme postgresql://, not postgres://")


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Former name of :func:`check_tracking_uri` (it only checked ``http(s)://``)."""
    check_tracking_uri(uri, timeout_s)


def _check_http(uri: str, timeout_s: float) -> None:
    import base64
    import ssl
    import urllib.error
    import urllib.request

    shown = _redact(uri)
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        raise _problem(uri, f"tracking.uri: {shown} has a port that is not a number in "
                            "1..65535; expected http(s)://host:port") from None
    host = parts.hostname
    if not host:
        raise _problem(uri, f"tracking.uri: {shown} names no host; expected "
                            "http(s)://host:port")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    headers = {}
    if parts.username is not None:  # MLflow's client (requests) sends these as basic auth
        user, password = unquote(parts.username), unquote(parts.password or "")
    else:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    context = None
    if parts.scheme == "https" and os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() \
            in ("1", "true"):
        context = ssl._create_unverified_context()
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "the credentials in the URI" if parts.username is not None else (
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" if user is not None
                else "no credentials")
            raise _problem(uri, f"tracking.uri: the MLflow tracking server at {shown} refused "
                                f"{given} (HTTP {exc.code}). Put the right user and password in "
                                "the URI (http://USER:PASSWORD@host:port) or in "
                                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.") from None
        return  # it answered (a proxy, or an older server without /health): reachable
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _problem(uri, f"tracking.uri: cannot reach the MLflow tracking server at {shown} "
                            f"({reason}). Start it (see README, 'MLflow') or use the default "
                            "sqlite:///mlflow.db.") from None


def _check_sqlite(uri: str) -> None:
    shown = _redact(uri)
    path = sqlite_path(uri)
    if path is None:
        raise _problem(uri, f"tracking.uri: {shown} is an in-memory database; its runs would be "
                            "gone when the driver exits. Use a file, e.g. sqlite:///mlflow.db")
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.is_dir():
        raise _problem(uri, f"tracking.uri: {shown}: {path} is a folder; expected a SQLite "
                            f"database file, e.g. sqlite:///{path / 'mlflow.db'}")
    if path.exists():
        if not path.is_file():
            raise _problem(uri, f"tracking.uri: {shown}: {path} is not a regular file; expected "
                                "a SQLite database file")
        try:
            with path.open("rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise _problem(uri, f"tracking.uri: {shown}: {path} cannot be read "
                                f"({exc.strerror or exc})") from None
        if header and header != SQLITE_HEADER:
            raise _problem(uri, f"tracking.uri: {shown}: {path} is not a SQLite database (it "
                                f"starts with {header[:8]!r}); point tracking.uri at an MLflow "
                                "database, or at a new file (MLflow creates it)")
        if not os.access(path, os.R_OK | os.W_OK) or not _writable(path.parent):
            raise _problem(uri, f"tracking.uri: {shown}: {path} is not writable (the file and "
                                "its folder must be, for SQLite's journal); fix the "
                                "permissions or use another file")
        if header:
            _check_mlflow_tables(uri, path)
        return
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise _problem(uri, f"tracking.uri: {shown}: {parent} is a file, so no database can "
                            "be created under it; point tracking.uri elsewhere")
    if not parent.is_dir():
        raise _problem(uri, f"tracking.uri: {shown}: the folder {parent} does not exist; "
                            f"create it (mkdir -p {parent}) or point tracking.uri elsewhere")
    if not _writable(parent):
        raise _problem(uri, f"tracking.uri: {shown}: the folder {parent} is not writable, so "
                            "the database cannot be created there; fix the permissions or "
                            "point tracking.uri elsewhere")


def _check_mlflow_tables(uri: str, path: Path) -> None:
    """A SQLite file that another program owns must not get MLflow's tables added to it."""
    import sqlite3
    from urllib.parse import quote

    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _problem(uri, f"tracking.uri: {_redact(uri)}: {path} is not a usable SQLite "
                            f"database ({exc}); restore it from a backup or use another "
                            "file") from None
    if tables and "experiments" not in tables:
        names = ", ".join(sorted(tables)[:5])
        raise _problem(uri, f"tracking.uri: {_redact(uri)}: {path} is a SQLite database but "
                            f"not an MLflow store (its tables: {names}); point tracking.uri "
                            "at an MLflow database or a new file")


def _check_database(uri: str, timeout_s: float) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = _redact(uri)
    try:
        url = make_url(uri)
    except (ArgumentError, ValueError) as exc:
        raise _problem(uri, f"tracking.uri: {shown} is not a database URI ({_short(exc)}); "
                            "expected e.g. postgresql://USER:PASSWORD@host:5432/mlflow") from None
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise _problem(uri, f"tracking.uri: {shown}: SQLAlchemy knows no driver "
                            f"{url.drivername!r}; expected e.g. postgresql://, "
                            "postgresql+psycopg2://, mysql+pymysql://, mssql+pyodbc://") from None
    load = getattr(dialect, "import_dbapi", None) or dialect.dbapi
    try:
        load()
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        package = DRIVER_PACKAGES.get(module, module or "the driver")
        also = (" (or write postgresql+psycopg2:// and `pip install psycopg2-binary`)"
                if module == "psycopg" else "")
        raise _problem(uri, f"tracking.uri: {shown}: the database driver for "
                            f"{url.drivername}:// is not installed (no module {module!r}); "
                            f"install it with `pip install {package}`{also}, or use the "
                            "default sqlite:///mlflow.db") from None
    host = url.host
    if not host or host.startswith("/"):
        return  # a local socket: the driver reports it
    port = url.port or DEFAULT_DB_PORTS.get(url.get_backend_name())
    if port is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise _problem(uri, f"tracking.uri: cannot reach the database at {shown} "
                            f"({exc.strerror or exc}); start it, check host and port, or use "
                            "the default sqlite:///mlflow.db") from None


# --------------------------------------------------------------------------- MLflow


def _experiment(uri: str, name: str) -> Any:
    """The MLflow experiment of that name (active or deleted), or None; never creates the
    store (an absent or empty ``sqlite:///`` file has no experiments)."""
    path = sqlite_path(uri)
    if path is not None and (not path.is_file() or path.stat().st_size == 0):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except MlflowException as exc:
        raise _problem(uri, f"tracking.uri: MLflow at {_redact(uri)} failed: {_short(exc, 400)}"
                       ) from None


def _deleted(uri: str, name: str, experiment_id: str, resume: bool) -> EnvironmentProblem:
    shown = _redact(uri)
    creds = " (with the credentials filled in)" if shown != uri else ""
    then = ", then rerun with --resume" if resume else ""
    return _problem(uri, f"name: the MLflow experiment {name!r} at {shown} was deleted (id "
                         f"{experiment_id}), and a deleted experiment keeps its name. Restore "
                         f"it with `MLFLOW_TRACKING_URI='{shown}' mlflow experiments restore "
                         f"--experiment-id {experiment_id}`{creds}{then}, or give the sweep "
                         "another name (--set name=NEW_NAME).")


def check_experiment(uri: str, name: str, resume: bool = False) -> None:
    """The sweep's MLflow experiment is not a deleted one (MLflow keeps a deleted
    experiment's name taken, and refuses runs in it). Call after :func:`check_tracking_uri`."""
    found = _experiment(uri, name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise _deleted(uri, name, found.experiment_id, resume)


def check_report_store(uri: str, name: str) -> None:
    """There is something to report: the store exists (an absent ``sqlite:///`` file is not
    created) and holds an active experiment ``name``. Raises when there is nothing, so
    ``--report`` and ``--compare`` write no table."""
    path = sqlite_path(uri)
    if path is not None and (not path.is_file() or path.stat().st_size == 0):
        what = "does not exist" if not path.exists() else (
            "is empty" if path.is_file() else "is not a file")
        raise _problem(uri, f"no MLflow store: {path} (tracking.uri {_redact(uri)}) {what}, so "
                            f"sweep {name!r} has nothing to report; run the sweep first (or "
                            "point tracking.uri at the store it used)")
    check_tracking_uri(uri)
    found = _experiment(uri, name)
    if found is None:
        raise _problem(uri, f"no MLflow experiment {name!r} at {_redact(uri)}: nothing to "
                            "report; run the sweep first")
    if found.lifecycle_stage == "deleted":
        raise _deleted(uri, name, found.experiment_id, resume=False)


# --------------------------------------------------------------------------- storage, name


def check_name(name: str) -> None:
    """The sweep's name is not a folder the project itself creates under ``storage``."""
    reserved = RESERVED_NAMES.get(name.lower())
    if reserved:
        raise EnvironmentProblem(
            f"name: got {name!r}; that name is reserved: storage/{name.lower()} is "
            f"{reserved}, so the sweep's results would land inside it. Choose another name "
            f"(--set name={name}_sweep); reserved: {', '.join(RESERVED_NAMES)}")


def check_storage(path: str | Path) -> None:
    """``storage`` is a writable folder, or can be created as one."""
    storage = Path(path).expanduser()
    if not storage.is_absolute():
        storage = Path.cwd() / storage
    if storage.exists():
        if not storage.is_dir():
            raise EnvironmentProblem(
                f"storage: {storage} is a file, not a folder; storage holds Ray's results, "
                "checkpoints and the stage cache: point it at a folder (or move the file)")
        if not _writable(storage):
            raise EnvironmentProblem(
                f"storage: the folder {storage} is not writable; fix its permissions or point "
                "storage elsewhere")
        return
    if storage.is_symlink():
        raise EnvironmentProblem(f"storage: {storage} is a broken symbolic link (to "
                                 f"{os.readlink(storage)}); remove it or point storage elsewhere")
    ancestor = storage.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        what = "is a broken symbolic link" if not ancestor.exists() else "is a file"
        raise EnvironmentProblem(
            f"storage: {storage} cannot be created: {ancestor} {what}; point storage at a "
            "folder that can be created")
    if not _writable(ancestor):
        raise EnvironmentProblem(
            f"storage: {storage} cannot be created: the folder {ancestor} is not writable; "
            "fix its permissions or point storage elsewhere")


# --------------------------------------------------------------------------- weights


def check_weights(path: str | Path | None, arch: str | None = None) -> None:
    """A ``backbone.weights`` file is a state_dict (a mapping of tensors) that loads with
    ``torch.load(path, map_location="cpu", weights_only=True)``, as every trial loads it;
    given ``arch``, it also fits that backbone (as :func:`debias.models.load_trunk_weights`
    loads it). ``'none'`` and ``'imagenet'`` pass. Loads the file once."""
    if path is None or str(path) in ("none", "imagenet"):
        return
    file = Path(path).expanduser()
    where = f"backbone.weights: {file}"
    if not file.is_file():
        raise EnvironmentProblem(f"{where} does not exist (or is not a file); expected "
                                 "'imagenet', 'none' or a state_dict file")
    import warnings

    import torch

    fix = "save one with torch.save(model.state_dict(), PATH)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not its format
        reason = "the file is empty or truncated" if isinstance(exc, EOFError) else _short(exc)
        hint = (" (it holds Python objects, e.g. a whole model saved with torch.save(model))"
                if "Unsupported global" in str(exc) else "")
        raise EnvironmentProblem(f"{where} is not a weights file that loads safely "
                                 f"(torch.load with weights_only=True: {reason}){hint}; expected "
                                 f"a state_dict: {fix}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        got = "an empty mapping" if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise EnvironmentProblem(f"{where} holds {got}, not a state_dict (a mapping of names "
                                 f"to tensors); {fix}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise EnvironmentProblem(
                f"{where} is not a state_dict: entry {key!r} holds {type(value).__name__}, "
                f"not a tensor; {fix}")
    if arch is not None:
        _check_fit(where, state, arch)


def _trunk_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The trunk's part of a state_dict, as :func:`debias.models.load_trunk_weights` takes it
    (keep the two in step)."""
    for prefix in ("trunk.", "module.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _check_fit(where: str, state: Mapping[str, Any], arch: str) -> None:
    from debias.models import ARCHS, build_trunk

    if arch not in ARCHS:
        return  # the spec refuses it
    trunk, _ = build_trunk(arch, "none")
    try:
        missing, unexpected = trunk.load_state_dict(_trunk_state(state), strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise EnvironmentProblem(f"{where} does not fit backbone.arch {arch} "
                                 f"({_short(exc, 300)}); use weights saved from a {arch}"
                                 ) from None
    if missing or unexpected:
        raise EnvironmentProblem(f"{where} does not fit backbone.arch {arch}: missing keys "
                                 f"{list(missing)[:5]}, unexpected keys {list(unexpected)[:5]}; "
                                 f"use weights saved from a {arch}")


# --------------------------------------------------------------------------- memory

#: The embedded dataset's peak memory while it is generated, per pixel of image_size**2:
#: all 5,000 digits resized (float32) and their resampling, about 16.6 kB, plus about 40 B
#: per image (canvas, textures, masks, the uint8 result), plus a fixed 150 MB. Measured on
#: this project's generator (peak RSS over 64..256 px and 100..1,000 images, within 15%
#: and above it at 256 px); see check_dataset_memory.
SYNTHETIC_BYTES_PER_PIXEL = 16_600
SYNTHETIC_BYTES_PER_IMAGE_PIXEL = 40
SYNTHETIC_FIXED_BYTES = 150 * 2**20


def synthetic_peak_bytes(image_size: int, size: int) -> int:
    """Roughly the peak memory of generating the embedded dataset (see the constants)."""
    pixels = int(image_size) ** 2
    return (SYNTHETIC_BYTES_PER_PIXEL * pixels + SYNTHETIC_BYTES_PER_IMAGE_PIXEL * int(size)
            * pixels + SYNTHETIC_FIXED_BYTES)


def available_memory() -> int | None:
    """MemAvailable of this machine (Linux), in bytes; None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_dataset_memory(dataset: Dataset) -> None:
    """The embedded dataset fits in this machine's memory before it is generated: its
    ``image_size`` x ``size`` is checked against MemAvailable (1024 px took 18.5 GB)."""
    if dataset.name != "synthetic":
        return
    size = dataset.size
    image_size = dataset.image_size or 32
    need, have = synthetic_peak_bytes(image_size, size), available_memory()
    if have is not None and need > have:
        raise EnvironmentProblem(
            f"dataset: generating the embedded dataset at image_size {image_size} with size "
            f"{size} takes about {need / 2**30:.1f} GiB of memory, and this machine has "
            f"{have / 2**30:.1f} GiB available; lower dataset.image_size (the memory grows "
            "with its square) or dataset.size")


# --------------------------------------------------------------------------- all of them


def _weights_values(spec: Any) -> Iterable[Any]:
    values: set[Any] = set()
    for method in spec.methods:
        values |= spec.values_of("backbone.weights", method)
    return sorted((v for v in values if v is not None), key=str)


def check_environment(spec: Any, resume: bool = False) -> None:
    """Every check, in order, for a sweep about to run (or ``--dry-run``) on this machine:
    the name, the tracking store, the storage folder, the weights files, the experiment."""
    check_name(spec.name)
    check_tracking_uri(spec.tracking_uri)
    check_storage(spec.storage)
    check_dataset_memory(spec.dataset)
    archs = {a for m in spec.methods for a in spec.values_of("backbone.arch", m)}
    arch = next(iter(archs)) if len(archs) == 1 else None
    for weights in _weights_values(spec):
        check_weights(weights, arch)
    check_experiment(spec.tracking_uri, spec.name, resume)
