"""The one registry that maps a method's name to its class.

``method: NAME`` in a sweep file is one of the built-in names below, a method an installed
package registers under the entry-point group ``debias.methods`` (``name = "pkg.mod:Class"``),
or ``package.module:ClassName`` for any importable module (``examples/custom_method.py`` is
one). Built-ins are imported on first use, not here: importing this package stays cheap and
the engine, which is handed a method class, never looks one up.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from debias.methods.base import Method

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Method",
    "MethodLoadError",
    "known_methods",
    "method_sections",
    "resolve_method",
    "static_load_problem",
]

#: Built-in methods, in the order tables and plots show them (ERM first: the reference).
BUILTIN: dict[str, str] = {
    "erm": "debias.methods.erm:ERM",
    "groupdro": "debias.methods.groupdro:GroupDRO",
    "jtt": "debias.methods.jtt:JTT",
    "dfr": "debias.methods.dfr:DFR",
    "clusterfix": "debias.methods.clusterfix:ClusterFix",
    "slim": "debias.methods.slim:SLIM",
}
ENTRY_POINT_GROUP = "debias.methods"


class MethodLoadError(ValueError):
    """A ``method:`` value that names no usable method; the message says why."""


@functools.cache
def _registered() -> dict[str, str]:
    """Built-ins, then methods installed packages register (a built-in name cannot be taken)."""
    out = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.value)
    return out


def known_methods() -> list[str]:
    """Every name ``method:`` accepts without a module path."""
    return list(_registered())


@functools.cache
def resolve_method(name: str) -> type[Method]:
    """The class behind a ``method:`` value, checked to be a method."""
    target = _registered().get(name, name)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise MethodLoadError(
            f"{name!r} is not a known method; expected one of {', '.join(known_methods())}, "
            "or package.module:ClassName for a method defined elsewhere")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MethodLoadError(
            f"{name!r}: cannot import module {module_name!r} ({exc}); is its folder on "
            "PYTHONPATH (or the package installed)?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise MethodLoadError(f"{name!r}: module {module_name!r} has no class {class_name!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise MethodLoadError(f"{name!r}: {module_name}.{class_name} is not a method (a "
                              "subclass of debias.methods.Method)")
    if not getattr(cls, "name", None):
        raise MethodLoadError(f"{name!r}: {module_name}.{class_name} sets no `name`")
    return cls


def method_sections() -> dict[str, type[Method]]:
    """{section name: method} of every method the registry knows by name."""
    out = {}
    for name in known_methods():
        try:
            cls = resolve_method(name)
        except MethodLoadError:
            continue  # a broken plugin must not stop sweeps that do not use it
        if cls.section:
            out[cls.section] = cls
    return out


def static_load_problem(value: str) -> str | None:
    """Why ``package.module:Class`` cannot name a method, found without running any of its
    code: the module is located as ``importlib.util.find_spec`` would (but without importing
    its packages), and its source must define ``Class`` at top level as a class with base
    classes (or import it). None: import it and check it is a Method subclass."""
    if ":" not in value or value in known_methods():
        return None
    module, _, name = value.partition(":")
    if not module or not name or not all(p.isidentifier() for p in module.split(".")) or \
            not name.isidentifier():
        return (f"got {value!r}; expected package.module:ClassName (a module path and a class "
                "name)")
    if module in sys.modules:
        return None  # already imported: importing it again runs nothing
    spec, path = None, None
    parts = module.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i + 1])
        loaded = sys.modules.get(prefix)
        if loaded is not None:
            spec, path = loaded.__spec__, getattr(loaded, "__path__", None)
            continue
        spec = importlib.machinery.PathFinder.find_spec(prefix, path)
        if spec is None:
            return (f"{value!r}: cannot import module {module!r} (no module {prefix!r} on "
                    "PYTHONPATH); is its folder on PYTHONPATH (or the package installed)?")
        path = spec.submodule_search_locations
        if i < len(parts) - 1 and path is None:
            return f"{value!r}: cannot import module {module!r} ({prefix!r} is not a package)"
    origin = getattr(spec, "origin", None)
    if not origin or not str(origin).endswith(".py"):
        return None  # compiled or namespace: nothing to read; the import checks it
    try:
        tree = ast.parse(Path(origin).read_bytes(), filename=str(origin))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{value!r}: module {module!r} ({origin}) does not parse ({exc})"
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return None if node.bases else (
                f"{value!r}: {module}.{name} is not a method (a subclass of "
                "debias.methods.Method): it has no base class")
        if isinstance(node, ast.ImportFrom | ast.Import) and any(
                (a.asname or a.name.split(".")[-1]) == name for a in node.names):
            return None
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return None
    return f"{value!r}: module {module!r} has no class {name!r} ({origin})"
